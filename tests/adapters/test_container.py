"""The container creates the Kubernetes and AWS adapters only when they are enabled."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock

from application.ports import DeploymentStatus
from config.container import Container
from config.settings import load

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
    """By default handlers get None for cluster and cloud, and a worker never loads kubernetes-asyncio
    or aioboto3 (the RSS budget of a worker depends on it)."""
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
            print(sorted(m for m in ("kubernetes_asyncio", "aioboto3", "botocore") if m in sys.modules))
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
