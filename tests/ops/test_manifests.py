"""What an operator relies on in every rendered overlay of deploy/ (kubectl kustomize, offline)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import kubernetes_validate
import pytest

from config.settings import Settings, load
from tests.ops.conftest import OVERLAYS

Doc = dict[str, Any]
# The oldest and newest Kubernetes versions whose schemas kubernetes-validate bundles (offline).
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
# Settings the broker and store issues add to config/settings.py; the overlays set them already.
SETTINGS_OF_OTHER_ISSUES = {
    "rabbitmq_url",
    "postgres_dsn",
    "pubsub_project",
    "pubsub_topic",
    "pubsub_subscription",
}
SECRET_NAME = re.compile(r"(URL|DSN|PASSWORD|TOKEN|SECRET|KEY|CREDENTIALS)$")


def only(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[Doc, ...], kind: str, name: str | None = None) -> Doc:
    found = [d for d in only(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def settings(docs: tuple[Doc, ...]) -> dict[str, str]:
    """The INCIDENTD_* values the pods get from the ConfigMap, by lower-case setting name."""
    data = one(docs, "ConfigMap")["data"]
    return {k.removeprefix("INCIDENTD_").lower(): v for k, v in data.items() if k.startswith("INCIDENTD_")}


def pod_specs(docs: tuple[Doc, ...]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def worker(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_the_broker_overlays_exist() -> None:
    """Both brokers can be deployed with `kubectl apply -k deploy/overlays/<broker>`."""
    assert {"rabbitmq", "pubsub"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schema(
    rendered: tuple[Doc, ...], version: str
) -> None:
    """kubectl apply would accept every built-in resource (strict: no misspelt or misplaced field)."""
    for doc in rendered:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no bundled schema; test_autoscaler checks what matters
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_settings_in_the_configmap_are_valid(rendered: tuple[Doc, ...]) -> None:
    """A typo or a bad value in the ConfigMap would stop every pod at start-up: each value loads."""
    values = settings(rendered)
    unknown = set(values) - set(Settings.model_fields)
    assert unknown <= SETTINGS_OF_OTHER_ISSUES, f"not a setting: {unknown - SETTINGS_OF_OTHER_ISSUES}"
    load(**{k: v for k, v in values.items() if k in Settings.model_fields})
    assert values["broker"] in {"rabbitmq", "pubsub"}
    assert values["store"] == "postgres"


def test_grace_period_exceeds_the_shutdown_timeout(rendered: tuple[Doc, ...]) -> None:
    """The kubelet never SIGKILLs a pod that is still draining within INCIDENTD_SHUTDOWN_TIMEOUT."""
    timeout = float(
        settings(rendered).get("shutdown_timeout", Settings.model_fields["shutdown_timeout"].default)
    )
    for where, spec in pod_specs(rendered):
        if where.startswith("Deployment"):
            # room for the final acks after the drain deadline
            assert spec["terminationGracePeriodSeconds"] >= timeout + 10, where


def test_probes_hit_the_ops_server(rendered: tuple[Doc, ...]) -> None:
    """Readiness asks /readyz and liveness /healthz, on the port the ops server listens on."""
    container = worker(rendered)
    ops_port = int(settings(rendered).get("ops_port", Settings.model_fields["ops_port"].default))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == ops_port, probe
    assert settings(rendered).get("ops_enabled", "true") == "true"


def test_prometheus_scrapes_the_metrics_service(rendered: tuple[Doc, ...]) -> None:
    """The Service selects the worker pods and its annotations point Prometheus at /metrics."""
    service = one(rendered, "Service")
    annotations = service["metadata"]["annotations"]
    ops_port = int(settings(rendered)["ops_port"])
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/path"], int(annotations["prometheus.io/port"])) == (
        "/metrics",
        ops_port,
    )
    pod_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == ops_port


def test_no_secret_value_is_in_the_manifests(rendered: tuple[Doc, ...]) -> None:
    """Credentials only arrive by reference to a Secret; nothing renders a Secret or a credential."""
    assert not only(rendered, "Secret")
    assert not [k for k in settings(rendered) if SECRET_NAME.search(k.upper())]
    for where, spec in pod_specs(rendered):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (where, env["name"])
    text = repr(rendered)
    assert not re.search(r"://[^/\s:@']+:[^/\s@']+@", text), "a URL with a password"


def test_broker_credentials_come_from_documented_secrets(rendered: tuple[Doc, ...], overlay: str) -> None:
    """The worker and the setup Job read the same, documented Secret keys for their broker and store."""
    expected = {("INCIDENTD_POSTGRES_DSN", "incidentd-postgres", "dsn")}
    if overlay.startswith("rabbitmq"):
        expected.add(("INCIDENTD_RABBITMQ_URL", "incidentd-rabbitmq", "url"))
    for where, spec in pod_specs(rendered):
        refs = {
            (env["name"], env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"])
            for env in spec["containers"][0].get("env", [])
            if "secretKeyRef" in env.get("valueFrom", {})
        }
        assert refs == expected, where


def test_pods_run_locked_down(rendered: tuple[Doc, ...]) -> None:
    """Non-root, read-only root, no privilege escalation, no capabilities, default seccomp, for every pod."""
    for where, spec in pod_specs(rendered):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"], where
            assert container["resources"]["limits"]["memory"], where


def test_the_writable_paths_are_emptydirs(rendered: tuple[Doc, ...]) -> None:
    """With a read-only root, /tmp and the SQLite data dir are writable volumes in every pod."""
    data_dir = str(PurePosixPath(settings(rendered)["sqlite_path"]).parent)
    for where, spec in pod_specs(rendered):
        empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts.get("/tmp") in empty and mounts.get(data_dir) in empty, where


def test_worker_and_setup_job_run_the_cli(rendered: tuple[Doc, ...]) -> None:
    """The Deployment runs `worker`, the one-shot Job runs `setup`, both from the same image."""
    job = one(rendered, "Job")
    setup = job["spec"]["template"]["spec"]["containers"][0]
    assert worker(rendered)["args"] == ["worker"] and setup["args"] == ["setup"]
    assert worker(rendered)["image"] == setup["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}


def test_rollouts_and_disruptions_keep_capacity(rendered: tuple[Doc, ...]) -> None:
    """A rollout starts the replacement before it stops a pod; a node drain takes one worker at a time."""
    deployment = one(rendered, "Deployment")
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxUnavailable"], rolling["maxSurge"]) == (0, 1)
    pdb = one(rendered, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_autoscaler(rendered: tuple[Doc, ...], overlay: str) -> None:
    """Exactly one autoscaler drives the Deployment: a CPU HPA, or (the -keda overlays) KEDA on the queue."""
    deployment = one(rendered, "Deployment")["metadata"]["name"]
    if overlay.endswith("-keda"):
        assert not only(rendered, "HorizontalPodAutoscaler"), "KEDA makes its own HPA"
        scaled = one(rendered, "ScaledObject")
        assert scaled["spec"]["scaleTargetRef"]["name"] == deployment
        auth = {d["metadata"]["name"] for d in only(rendered, "TriggerAuthentication")}
        trigger = scaled["spec"]["triggers"][0]
        assert (
            trigger["type"] == {"rabbitmq": "rabbitmq", "pubsub": "gcp-pubsub"}[overlay.removesuffix("-keda")]
        )
        assert trigger["authenticationRef"]["name"] in auth
        if trigger["type"] == "gcp-pubsub":
            assert trigger["metadata"]["subscriptionName"].endswith(
                "/" + settings(rendered)["pubsub_subscription"]
            )
    else:
        assert not [d for d in rendered if d["kind"] in KEDA_KINDS]
        hpa = one(rendered, "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment,
        }
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_rbac_is_least_privilege(rendered: tuple[Doc, ...]) -> None:
    """The worker may read Deployments and Namespaces and patch Deployments and their scale, no more.

    Exactly what the Kubernetes adapter uses (docs/adapters.md#rbac): get/list, rollout restart, scale.
    """
    allowed = {
        ("", "namespaces"): {"get", "list"},
        ("apps", "deployments"): {"get", "list", "patch"},
        ("apps", "deployments/scale"): {"patch"},
    }
    granted: dict[tuple[str, str], set[str]] = {}
    for role in only(rendered, "ClusterRole") + only(rendered, "Role"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == allowed
    account = one(rendered, "ServiceAccount")["metadata"]
    for binding in only(rendered, "ClusterRoleBinding") + only(rendered, "RoleBinding"):
        subjects = [(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]]
        assert subjects == [("ServiceAccount", account["name"], account["namespace"])]
    for _, spec in pod_specs(rendered):
        assert spec["serviceAccountName"] == account["name"]
