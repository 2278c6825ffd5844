"""A stateful Kubernetes API on 127.0.0.1: kmock's KubernetesEmulator (objects live in
``emulator.objects``), with namespace ``prod`` holding Deployment ``web``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest

NAMESPACES = kmock.resource("v1/namespaces")
DEPLOYMENTS = kmock.resource("apps/v1/deployments")


def deployment(
    namespace: str,
    name: str,
    *,
    replicas: int = 3,
    ready: int = 3,
    image: str = "registry.example/web:1.4.2",
    restarted_at: str | None = None,
) -> dict[str, Any]:
    """A Deployment as the API server returns it after the controller has observed it."""
    template_meta: dict[str, Any] = {"labels": {"app": name}}
    if restarted_at:
        template_meta["annotations"] = {"kubectl.kubernetes.io/restartedAt": restarted_at}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "generation": 2},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": template_meta,
                "spec": {
                    "containers": [{"name": "app", "image": image}, {"name": "proxy", "image": "envoy:1"}]
                },
            },
        },
        "status": {
            "observedGeneration": 2,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
        },
    }


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _serve_namespaces(emulator: kmock.KubernetesEmulator) -> None:
    """kmock 0.8 reads ``/api/v1/namespaces/<name>`` as "namespace <name>, no resource" and answers 404;
    this reaction serves the Namespace objects from the emulator's own state instead."""

    async def read_namespace(request: kmock.Request) -> dict[str, Any]:
        key = (NAMESPACES, None, request.namespace)
        if key not in emulator.objects or emulator.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return dict(emulator.objects[key].raw)

    emulator["get", re.compile(r"^/api/v1/namespaces/[^/]+$")] << read_namespace


@pytest.fixture
async def k8s() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    """A fresh stateful Kubernetes API (and its URL) with namespace ``prod`` holding Deployment ``web``."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        _serve_namespaces(emulator)
        emulator.objects[NAMESPACES, None, "prod"] = namespace("prod")
        emulator.objects[DEPLOYMENTS, "prod", "web"] = deployment(
            "prod", "web", restarted_at="2026-11-01T08:30:00Z"
        )
        yield emulator, str(server.url).rstrip("/")
