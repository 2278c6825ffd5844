"""The Kubernetes adapter against kmock's stateful Kubernetes API emulator."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest

from application.errors import PermanentError, TransientError
from application.ports import DeploymentStatus, Missing
from infra.kubernetes import RESTARTED_AT, KubernetesCluster, connect
from tests.adapters.conftest import free_port
from tests.standins.kubernetes import DEPLOYMENTS, deployment

K8s = tuple[kmock.KubernetesEmulator, str]
WEB = "/apis/apps/v1/namespaces/prod/deployments/web"


def stored(emulator: kmock.KubernetesEmulator, name: str = "web") -> dict[str, Any]:
    """The Deployment as the emulator holds it now (plain dicts, for exact comparisons)."""
    obj = emulator.objects[DEPLOYMENTS, "prod", name]
    return {key: _plain(value) for key, value in obj.items()}


def _plain(value: Any) -> Any:
    return {k: _plain(v) for k, v in value.items()} if hasattr(value, "items") else value


def patches(emulator: kmock.KubernetesEmulator) -> list[Any]:
    return [r for r in emulator["patch"]]


# --- reading ----------------------------------------------------------------------------------------


async def test_status_of_an_existing_deployment_is_read(cluster: KubernetesCluster) -> None:
    """Replicas, container images, rollout state and the last restart come from the Deployment."""
    status = await cluster.deployment_status("prod", "web")

    assert status == DeploymentStatus(
        namespace="prod",
        name="web",
        desired_replicas=3,
        ready_replicas=3,
        updated_replicas=3,
        available_replicas=3,
        images=("registry.example/web:1.4.2", "envoy:1"),
        rollout="complete",
        last_restart=datetime(2026, 11, 1, 8, 30, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"status": {"readyReplicas": 1, "availableReplicas": 1}}, "progressing"),
        ({"status": {"updatedReplicas": 1}}, "progressing"),
        ({"metadata": {"generation": 3}}, "progressing"),
        (
            {
                "status": {
                    "conditions": [
                        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
                    ]
                }
            },
            "stalled",
        ),
    ],
    ids=["pods-not-ready", "pods-not-updated", "spec-not-observed", "deadline-exceeded"],
)
async def test_rollout_state_follows_kubectl_rollout_status(
    k8s: K8s, cluster: KubernetesCluster, change: dict[str, Any], expected: str
) -> None:
    """A Deployment mid-rollout reads as progressing, one past its progress deadline as stalled."""
    emulator, _ = k8s
    emulator.objects[DEPLOYMENTS, "prod", "web"].patch(change)

    status = await cluster.deployment_status("prod", "web")

    assert isinstance(status, DeploymentStatus)
    assert status.rollout == expected


async def test_a_missing_deployment_reports_missing(cluster: KubernetesCluster) -> None:
    """A Deployment the alert names but the namespace lacks is a result saying so, not an error."""
    status = await cluster.deployment_status("prod", "checkout")

    assert status == Missing("Deployment", "prod", "checkout")
    assert str(status) == "Deployment prod/checkout does not exist"


async def test_a_missing_namespace_reports_the_namespace_missing(cluster: KubernetesCluster) -> None:
    """When the namespace itself is gone, the result names the namespace, not the Deployment."""
    assert await cluster.deployment_status("staging", "web") == Missing("Namespace", "staging")
    assert await cluster.namespace_exists("prod") is True
    assert await cluster.namespace_exists("staging") is False


async def test_a_name_that_cannot_exist_is_permanent_without_a_request(
    k8s: K8s, cluster: KubernetesCluster
) -> None:
    """A label value that is no valid Kubernetes name fails at once and never reaches the API."""
    emulator, _ = k8s
    with pytest.raises(PermanentError, match="not a valid"):
        await cluster.deployment_status("prod", "../../api/v1/secrets")
    with pytest.raises(PermanentError, match="not a valid"):
        await cluster.namespace_exists("Prod_Namespace")
    assert len(emulator) == 0


# --- acting -----------------------------------------------------------------------------------------


async def test_rollout_restart_leaves_the_restarted_at_annotation(
    k8s: K8s, cluster: KubernetesCluster
) -> None:
    """The Deployment's pod template gets kubectl's restartedAt annotation (RFC 3339, now), sent as the
    same strategic-merge patch ``kubectl rollout restart`` sends; the rest of the template is kept."""
    emulator, _ = k8s
    before = datetime.now(UTC).replace(microsecond=0)

    result = await cluster.rollout_restart("prod", "web")

    template = stored(emulator)["spec"]["template"]
    restarted_at = template["metadata"]["annotations"][RESTARTED_AT]
    assert before <= datetime.fromisoformat(restarted_at) <= before + timedelta(seconds=5)
    assert restarted_at.endswith("Z")
    assert template["spec"]["containers"][0]["image"] == "registry.example/web:1.4.2"
    (patch,) = patches(emulator)
    assert patch.headers["Content-Type"] == "application/strategic-merge-patch+json"
    assert patch.data == {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: restarted_at}}}}}
    assert str(result) == f"rollout restart deployment prod/web: {RESTARTED_AT}={restarted_at}"
    status = await cluster.deployment_status("prod", "web")
    assert isinstance(status, DeploymentStatus)
    assert status.last_restart == datetime.fromisoformat(restarted_at)


async def test_rollout_restart_of_a_missing_deployment_is_permanent(
    k8s: K8s, cluster: KubernetesCluster
) -> None:
    """Restarting what does not exist dead-letters with the reason, and patches nothing."""
    emulator, _ = k8s
    with pytest.raises(PermanentError, match="Deployment prod/checkout does not exist"):
        await cluster.rollout_restart("prod", "checkout")
    assert patches(emulator) == []


async def test_rollout_restart_refuses_a_paused_deployment(k8s: K8s, cluster: KubernetesCluster) -> None:
    """Like kubectl, a paused Deployment is not restarted (its pods would not roll anyway)."""
    emulator, _ = k8s
    emulator.objects[DEPLOYMENTS, "prod", "web"].patch({"spec": {"paused": True}})

    with pytest.raises(PermanentError, match="paused"):
        await cluster.rollout_restart("prod", "web")
    assert (
        stored(emulator)["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
        == "2026-11-01T08:30:00Z"
    )


async def test_dry_run_restart_and_scale_change_nothing(k8s: K8s) -> None:
    """In dry-run the actions check the Deployment exists and report what they would do, without patching."""
    emulator, url = k8s
    cluster = await connect(host=url, call_timeout=2.0, dry_run=True)
    try:
        restart = await cluster.rollout_restart("prod", "web")
        scale = await cluster.scale("prod", "web", 0)
        with pytest.raises(PermanentError, match="does not exist"):
            await cluster.scale("prod", "checkout", 1)
    finally:
        await cluster.close()

    assert restart.dry_run and scale.dry_run
    assert str(scale) == "scale deployment prod/web: replicas 3 -> 0 (dry run, nothing changed)"
    assert patches(emulator) == []
    assert stored(emulator) == deployment("prod", "web", restarted_at="2026-11-01T08:30:00Z")


async def test_scale_changes_the_replicas(k8s: K8s, cluster: KubernetesCluster) -> None:
    """Scaling goes through the scale subresource and changes the Deployment's desired replicas."""
    emulator, _ = k8s

    result = await cluster.scale("prod", "web", 5)

    assert stored(emulator)["spec"]["replicas"] == 5
    (patch,) = patches(emulator)
    assert patch.subresource == "scale"
    assert patch.data == {"spec": {"replicas": 5}}
    assert result.detail == "replicas 3 -> 5"


@pytest.mark.parametrize("replicas", [-1, 2.5, True])
async def test_scale_to_an_impossible_count_is_permanent(
    k8s: K8s, cluster: KubernetesCluster, replicas: Any
) -> None:
    """Negative, fractional or boolean replica counts are refused before any request."""
    emulator, _ = k8s
    with pytest.raises(PermanentError, match="replicas"):
        await cluster.scale("prod", "web", replicas)
    assert len(emulator) == 0


# --- errors -----------------------------------------------------------------------------------------


async def test_a_404_on_an_action_classifies_permanent(k8s: K8s, cluster: KubernetesCluster) -> None:
    """A Deployment deleted between the read and the patch (the API answers 404) is a permanent failure."""
    emulator, _ = k8s
    emulator["patch", WEB] << 404

    with pytest.raises(PermanentError, match="404"):
        await cluster.rollout_restart("prod", "web")


async def test_forbidden_classifies_permanent(k8s: K8s, cluster: KubernetesCluster) -> None:
    """Missing RBAC (403) will not fix itself by retrying: permanent, with the status in the reason."""
    emulator, _ = k8s
    emulator["get", WEB] << 403

    with pytest.raises(PermanentError, match="403"):
        await cluster.deployment_status("prod", "web")


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [(503, {}, None), (500, {}, None), (429, {"Retry-After": "7"}, 7.0)],
)
async def test_server_errors_and_throttling_classify_transient(
    k8s: K8s, cluster: KubernetesCluster, status: int, headers: dict[str, str], retry_after: float | None
) -> None:
    """5xx and 429 are retried later; a 429's Retry-After becomes the least redelivery delay."""
    emulator, _ = k8s
    emulator["get", WEB] << status << kmock.headers(headers)

    with pytest.raises(TransientError, match=str(status)) as failure:
        await cluster.deployment_status("prod", "web")

    assert failure.value.retry_after == retry_after


async def test_a_slow_api_times_out_transient(k8s: K8s) -> None:
    """An API server that does not answer within the timeout is a transient failure, not a hang."""
    emulator, url = k8s

    async def never_answers() -> dict[str, Any]:
        await asyncio.sleep(5)
        return {}

    emulator["get", WEB] << never_answers
    cluster = await connect(host=url, call_timeout=0.3)
    try:
        with pytest.raises(TransientError, match=r"within 0\.3s"):
            await cluster.deployment_status("prod", "web")
    finally:
        await cluster.close()


async def test_an_unreachable_api_classifies_transient() -> None:
    """Connection refused (API server down, network trouble) is retried later."""
    cluster = await connect(host=f"http://127.0.0.1:{free_port()}", call_timeout=2.0)
    try:
        with pytest.raises(TransientError, match="cannot reach"):
            await cluster.namespace_exists("prod")
    finally:
        await cluster.close()


# --- configuration ----------------------------------------------------------------------------------


async def test_kubeconfig_file_is_used_with_its_credentials(k8s: K8s, tmp_path: Path) -> None:
    """A kubeconfig's cluster server and user token are used for every call."""
    emulator, url = k8s
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{url}"}}}}]
users: [{{name: incidentd, user: {{token: s3cr3t-token}}}}]
contexts: [{{name: test, context: {{cluster: kmock, user: incidentd, namespace: prod}}}}]
current-context: test
"""
    )
    cluster = await connect(kubeconfig=kubeconfig, call_timeout=2.0)
    try:
        status = await cluster.deployment_status("prod", "web")
    finally:
        await cluster.close()

    assert isinstance(status, DeploymentStatus)
    assert [r.headers.get("Authorization") for r in emulator] == ["Bearer s3cr3t-token"]
