"""The container opens each adapter only when the settings enable it, and hands it to the handlers."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
from dependency_injector import providers

from application.dispatcher import Dispatcher
from application.messages import TYPE_ATTR, Disposition, Message, Outcome
from application.ports import DeploymentStatus
from config.container import Container
from config.settings import load
from tests.unit.test_dispatcher import FakeDelivery

ROOT = Path(__file__).resolve().parents[2]


async def test_enabled_adapters_are_created_from_settings(
    k8s: tuple[kmock.KubernetesEmulator, str], moto_url: str, aws_env: None, bucket: str, tmp_path: Path
) -> None:
    """With both adapters enabled, handlers get a working cluster and cloud configured from settings."""
    settings = load(
        sqlite_path=tmp_path / "incidentd.db",
        kubernetes_enabled=True,
        kubernetes_host=k8s[1],
        aws_enabled=True,
        aws_endpoint_url=moto_url,
        aws_archive_bucket=bucket,
    )
    container = Container(settings=settings)
    try:
        dependencies: dict[str, Any] = await container.handler_dependencies()  # type: ignore[misc]
        status = await dependencies["cluster"].deployment_status("prod", "web")
        uri = await dependencies["cloud"].archive({"ok": True}, id="one", at=datetime(2026, 1, 2, tzinfo=UTC))
    finally:
        await container.shutdown_resources()  # type: ignore[misc]

    assert isinstance(status, DeploymentStatus)
    assert uri == f"s3://{bucket}/incidents/2026/01/02/one.json"


def test_disabled_adapters_are_none_and_their_libraries_never_imported(tmp_path: Path) -> None:
    """By default handlers get None for cluster and cloud, and a worker never loads the client library
    of an adapter or broker it does not use (the RSS budget of a worker depends on it)."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from config.container import Container
        from config.settings import load

        async def main():
            container = Container(settings=load(sqlite_path=sys.argv[1]))
            await container.dispatcher()
            dependencies = await container.handler_dependencies()
            print(dependencies["cluster"], dependencies["cloud"])
            unused = ("kubernetes_asyncio", "aioboto3", "botocore", "asynch", "gidgethub", "aio_pika",
                      "google.cloud.pubsub_v1", "asyncpg", "bm25s")
            print(sorted(m for m in unused if m in sys.modules))
            await container.shutdown_resources()

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "incidentd.db")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["None None", "[]"]


async def test_an_outcome_observer_given_at_construction_sees_each_outcome(tmp_path: Path) -> None:
    """An observer passed as ``Container(extra_observers=...)`` (how ``worker --from`` counts what it fed)
    is told the outcome of each message the container's dispatcher settles."""
    seen: list[tuple[str, str, Disposition]] = []

    def record(message: Message, command_type: str, outcome: Outcome, duration: float) -> None:
        seen.append((message.message_id, command_type, outcome.disposition))

    container = Container(settings=load(sqlite_path=tmp_path / "incidentd.db"), extra_observers=[record])
    try:
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        delivery = FakeDelivery(Message(b'{"title": "db down"}', {TYPE_ATTR: "incident.create"}, "m-1"))
        dispatcher.submit(delivery)
        await asyncio.wait_for(delivery.settled.wait(), 10)
    finally:
        await container.shutdown_resources()  # type: ignore[misc]

    assert seen == [("m-1", "incident.create", Disposition.ACK)]


def test_every_adapter_the_container_names_can_be_opened() -> None:
    """Each adapter is named by path (so that its library is imported only when enabled): every path
    names an async context manager function, so enabling any adapter never fails on a misspelt name."""
    paths = {
        resource.args[0]
        for resource in Container(settings=load()).traverse(types=[providers.Resource])
        if resource.args and isinstance(resource.args[0], str)
    }
    opened = {}
    for path in sorted(paths):
        module, name = path.rsplit(".", 1)
        opened[path] = inspect.isasyncgenfunction(getattr(importlib.import_module(module), name).__wrapped__)

    assert len(opened) == 13, sorted(opened)  # 2 stores, 3 brokers, 6 adapters, 2 loops
    assert all(opened.values()), opened
