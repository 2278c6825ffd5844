"""``incidents ack`` end to end: the CLI publishes on the real RabbitMQ, a worker process consumes it and
changes the store - the CLI itself never writes incidents."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from tests.incidents.conftest import FIXTURES
from tests.rabbitmq.conftest import rabbitmq, settings  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]


def _env(names: Settings, db: Path) -> dict[str, str]:
    return os.environ | {
        "INCIDENTD_BROKER": "rabbitmq", "INCIDENTD_RABBITMQ_URL": names.rabbitmq_url,
        "INCIDENTD_RABBITMQ_EXCHANGE": names.rabbitmq_exchange,
        "INCIDENTD_RABBITMQ_QUEUE": names.rabbitmq_queue, "INCIDENTD_SQLITE_PATH": str(db),
        "INCIDENTD_LOG_LEVEL": "error", "INCIDENTD_OPS_ENABLED": "false", "USER": "alice",
    }  # fmt: skip


async def _app(env: dict[str, str], *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out.decode()
    return out.decode()


async def _eventually(check: Callable[[], Awaitable[Any]], tries: int = 60) -> Any:
    """Poll ``check`` (each try runs the CLI) until it returns something; at most ``tries`` times."""
    for _ in range(tries):
        if found := await check():
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"{check.__name__} never held")


async def test_ack_is_published_and_applied_by_the_worker(settings: Settings, tmp_path: Path) -> None:  # noqa: F811
    """An alert published to RabbitMQ opens an incident in the worker; ``incidents ack ID --note`` prints
    a message id, and the worker then shows the incident acknowledged by the CLI's user with the note."""
    env = _env(settings, tmp_path / "incidents.db")
    await _app(env, "setup")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", "worker", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _app(env, "publish", "alertmanager.webhook", str(FIXTURES / "alertmanager_firing.json"))

        async def incidents() -> list[dict[str, Any]]:
            return json.loads(await _app(env, "incidents", "list", "--json"))  # type: ignore[no-any-return]

        first = (await _eventually(incidents))[0]
        message_id = (await _app(env, "incidents", "ack", first["id"], "--note", "on it")).strip()

        async def acknowledged() -> dict[str, Any] | None:
            return next(
                (i for i in await incidents() if i["id"] == first["id"] and i["status"] == "acknowledged"),
                None,
            )

        incident = await _eventually(acknowledged)
        entry = incident["timeline"][-1]
        assert (entry["kind"], entry["actor"], entry["note"], entry["message_id"]) == (
            "acknowledged",
            "alice",
            "on it",
            message_id,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 40)
