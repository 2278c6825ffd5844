"""What an operator relies on in every rendered overlay of deploy/ (kubectl kustomize, offline)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config.settings import Settings, load
from tests.ops.conftest import OVERLAYS, ROOT, kubectl

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
        elif doc["kind"] == "CronJob":
            yield f"CronJob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def worker(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture
def with_kubernetes(overlay: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Doc, ...]:
    """The overlay plus deploy/components/kubernetes, the way the component's comment tells users to add it
    (an overlay of their own; kustomize wants relative paths)."""
    if overlay not in _WITH_KUBERNETES:
        mine = tmp_path_factory.mktemp(f"with-kubernetes-{overlay}")
        deploy = ROOT / "deploy"
        (mine / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{os.path.relpath(deploy / 'overlays' / overlay, mine)}]\n"
            f"components: [{os.path.relpath(deploy / 'components' / 'kubernetes', mine)}]\n"
        )
        result = subprocess.run(
            [kubectl(), "kustomize", str(mine)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        _WITH_KUBERNETES[overlay] = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    return _WITH_KUBERNETES[overlay]


_WITH_KUBERNETES: dict[str, tuple[Doc, ...]] = {}


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
    """The worker and the setup Job read the same, documented Secret keys for their broker and store; the
    maintenance CronJob only the store's (it never talks to the broker)."""
    store = {("INCIDENTD_POSTGRES_DSN", "incidentd-postgres", "dsn")}
    expected = set(store)
    if overlay.startswith("rabbitmq"):
        expected.add(("INCIDENTD_RABBITMQ_URL", "incidentd-rabbitmq", "url"))
    for where, spec in pod_specs(rendered):
        refs = {
            (env["name"], env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"])
            for env in spec["containers"][0].get("env", [])
            if "secretKeyRef" in env.get("valueFrom", {})
        }
        assert refs == (store if where.startswith("CronJob") else expected), where


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


def granted_rules(docs: tuple[Doc, ...]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for role in only(docs, "ClusterRole") + only(docs, "Role"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def mounts_token(docs: tuple[Doc, ...], where: str, spec: Doc) -> bool:
    """Whether the pod gets an API token: its own setting, else its ServiceAccount's (default true)."""
    account = one(docs, "ServiceAccount", spec["serviceAccountName"])
    return bool(spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken", True)))


def test_without_the_kubernetes_adapter_there_is_no_rbac_and_no_token(rendered: tuple[Doc, ...]) -> None:
    """The overlays leave the Kubernetes adapter off: they grant nothing on the API, and no pod gets a
    ServiceAccount token to call it with."""
    assert settings(rendered)["kubernetes_enabled"] == "false"
    rbac_kinds = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    assert not [d["metadata"]["name"] for d in rendered if d["kind"] in rbac_kinds]
    account = one(rendered, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for where, spec in pod_specs(rendered):
        assert spec["serviceAccountName"] == account["metadata"]["name"], where
        assert not mounts_token(rendered, where, spec), where


# The API calls infra/kubernetes.py makes (kubernetes-asyncio method names) and the permission each needs.
API_CALLS = {
    "read_namespace": ("", "namespaces", "get"),
    "read_namespaced_deployment": ("apps", "deployments", "get"),
    "patch_namespaced_deployment": ("apps", "deployments", "patch"),
    "patch_namespaced_deployment_scale": ("apps", "deployments/scale", "patch"),
}


def needed_permissions() -> dict[tuple[str, str], set[str]]:
    """What the adapter's code calls, read from infra/kubernetes.py (a new call fails this until it is
    added to API_CALLS and to the RBAC)."""
    source = (ROOT / "infra" / "kubernetes.py").read_text()
    calls = set(re.findall(r"self\._(?:core|apps)\.(\w+)", source))
    assert calls <= set(API_CALLS), f"API calls with no RBAC mapping: {calls - set(API_CALLS)}"
    needed: dict[tuple[str, str], set[str]] = {}
    for call in calls:
        group, resource, verb = API_CALLS[call]
        needed.setdefault((group, resource), set()).add(verb)
    return needed


def test_the_kubernetes_component_grants_exactly_what_the_adapter_calls(
    with_kubernetes: tuple[Doc, ...],
) -> None:
    """With deploy/components/kubernetes, the worker may do what infra/kubernetes.py calls and nothing
    else: get Namespaces and Deployments (no cluster-wide list), patch Deployments and their scale. The
    patch is bound per namespace (RoleBinding), only get cluster-wide."""
    assert granted_rules(with_kubernetes) == needed_permissions()
    assert settings(with_kubernetes)["kubernetes_enabled"] == "true"
    account = one(with_kubernetes, "ServiceAccount")["metadata"]
    for binding in only(with_kubernetes, "ClusterRoleBinding") + only(with_kubernetes, "RoleBinding"):
        subjects = [(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]]
        assert subjects == [("ServiceAccount", account["name"], account["namespace"])]
    for binding in only(with_kubernetes, "ClusterRoleBinding"):
        role = one(with_kubernetes, "ClusterRole", binding["roleRef"]["name"])
        assert {verb for rule in role["rules"] for verb in rule["verbs"]} == {"get"}


def test_the_kubernetes_component_mounts_the_token_in_the_worker_only(
    with_kubernetes: tuple[Doc, ...],
) -> None:
    """The API token reaches the worker pods, which call the API, and not the setup or maintenance pods."""
    tokens = {where: mounts_token(with_kubernetes, where, spec) for where, spec in pod_specs(with_kubernetes)}
    assert tokens == {where: where.startswith("Deployment") for where in tokens}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_kubernetes_component_validates(with_kubernetes: tuple[Doc, ...], version: str) -> None:
    """An overlay with the component renders resources kubectl apply would accept."""
    for doc in with_kubernetes:
        if not doc["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_worker_takes_ingress_on_its_ops_port_only(rendered: tuple[Doc, ...]) -> None:
    """A NetworkPolicy admits traffic to the worker pods on the ops port (probes, Prometheus) and nothing
    else; the setup and maintenance pods admit none. Every pod is covered by an Ingress policy."""
    policies = only(rendered, "NetworkPolicy")
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)

    def selects(policy: Doc, labels: dict[str, str]) -> bool:
        selector = policy["spec"]["podSelector"]
        if not selector.get("matchLabels", {}).items() <= labels.items():
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))

    for doc in rendered:
        if doc["kind"] not in {"Deployment", "Job", "CronJob"}:
            continue
        template = (
            doc["spec"]["jobTemplate"]["spec"]["template"]
            if doc["kind"] == "CronJob"
            else doc["spec"]["template"]
        )
        covering = [p for p in policies if selects(p, template["metadata"]["labels"])]
        assert covering, doc["metadata"]["name"]
        rules = [rule for p in covering for rule in p["spec"].get("ingress", [])]
        if doc["kind"] == "Deployment":
            ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
            assert rules == [{"ports": [{"port": "ops", "protocol": "TCP"}]}], rules
            assert ports["ops"] == int(settings(rendered)["ops_port"])
        else:
            assert rules == [], doc["metadata"]["name"]


def test_maintenance_runs_as_a_cronjob_instead_of_in_the_workers(rendered: tuple[Doc, ...]) -> None:
    """`incidentd maintenance` runs hourly from the worker's image, never two at once, and the workers,
    whose settings say so, leave retention to it."""
    cron = one(rendered, "CronJob", "incidentd-maintenance")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["maintenance"]
    assert container["image"] == worker(rendered)["image"]
    values = settings(rendered)
    assert float(values["maintenance_interval"]) == 0
    assert float(values["processed_messages_retention_days"]) >= 31
