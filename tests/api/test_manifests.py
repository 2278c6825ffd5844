"""deploy/api/<broker>: the ingest's manifests running ``serve`` on the PostgreSQL store (kubectl
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


@cache
def render(variant: str) -> tuple[Doc, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy" / "api" / variant)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"kubectl kustomize deploy/api/{variant} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: tuple[Doc, ...], kind: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.mark.parametrize("variant", ["rabbitmq", "pubsub"])
def test_serve_on_postgres_with_the_ingests_service_and_probes(variant: str) -> None:
    """The Deployment runs `serve` with valid settings on the PostgreSQL store (DSN from the worker's
    Secret), keeps the ingest's broker settings, Service and probes, and every resource validates."""
    docs = render(variant)
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    deployment = one(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["INCIDENTD_POSTGRES_DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "incidentd-postgres",
        "key": "dsn",
    }
    data = one(docs, "ConfigMap")["data"]
    assert data["INCIDENTD_STORE"] == "postgres" and data["INCIDENTD_BROKER"] == variant
    settings = load(None, **{k.removeprefix("INCIDENTD_").lower(): v for k, v in data.items()})
    assert settings.store == "postgres" and settings.http_port == 8000
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    service = one(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
