"""deploy/ingest/<broker>: what an operator relies on in the rendered ingest manifests (kubectl
kustomize, offline; schemas from kubernetes-validate)."""

from __future__ import annotations

import subprocess
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config.settings import load
from tests.ops.conftest import ROOT, kubectl

Doc = dict[str, Any]
VARIANTS = ("rabbitmq", "pubsub")
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


@cache
def _render(variant: str) -> tuple[Doc, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy" / "ingest" / variant)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"kubectl kustomize deploy/ingest/{variant} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=VARIANTS)
def rendered(request: pytest.FixtureRequest) -> tuple[Doc, ...]:
    return _render(str(request.param))


def one(docs: tuple[Doc, ...], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schema(
    rendered: tuple[Doc, ...], version: str
) -> None:
    """kubectl apply would accept every resource (strict: no misspelt or misplaced field)."""
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_ingest_deployment_has_what_an_operator_expects(rendered: tuple[Doc, ...]) -> None:
    """The Deployment runs `ingest` with its settings valid; probes on the ops port (/readyz, /healthz);
    the grace period exceeds the shutdown timeout; the tokens Secret is mounted as a directory (so a
    rotation reaches the file) where INCIDENTD_HTTP_TOKENS_FILE points."""
    values = {k.removeprefix("INCIDENTD_").lower(): v for k, v in one(rendered, "ConfigMap")["data"].items()}
    settings = load(**values)
    assert settings.broker in {"rabbitmq", "pubsub"} and settings.http_tokens_file is not None
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    main = container(rendered)
    assert main["args"] == ["ingest"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"http": settings.http_port, "ops": settings.ops_port}
    assert spec["terminationGracePeriodSeconds"] > settings.shutdown_timeout + 5
    mount = next(m for m in main["volumeMounts"] if m["name"] == "tokens")
    assert "subPath" not in mount and str(settings.http_tokens_file).startswith(mount["mountPath"] + "/")
    volume = next(v for v in spec["volumes"] if v["name"] == "tokens")
    assert volume["secret"]["secretName"] == "incidentd-ingest-tokens"
    assert spec["automountServiceAccountToken"] is False
    assert main["securityContext"]["readOnlyRootFilesystem"] is True


def test_service_pdb_hpa_and_network_policy(rendered: tuple[Doc, ...]) -> None:
    """The Service sends port 80 to the http port; the PDB and the HPA (CPU) cover the ingest pods;
    the NetworkPolicy admits the ingest port and nothing else."""
    labels = one(rendered, "Deployment")["spec"]["selector"]["matchLabels"]
    service = one(rendered, "Service")["spec"]
    assert service["selector"] == labels and [p["targetPort"] for p in service["ports"]] == ["http"]
    assert one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    hpa = one(rendered, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "incidentd-ingest"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    policy = one(rendered, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == labels and policy["policyTypes"] == ["Ingress"]
    assert [rule["ports"] for rule in policy["ingress"]] == [[{"port": "http", "protocol": "TCP"}]]


def test_no_secret_value_is_in_the_manifests(rendered: tuple[Doc, ...]) -> None:
    """No Secret is rendered (tokens and broker URLs are created in the cluster, docs/ingest.md)."""
    assert not [d for d in rendered if d["kind"] == "Secret"]
    env = {e["name"]: e for e in container(rendered).get("env", [])}
    assert all("valueFrom" in e for e in env.values())
