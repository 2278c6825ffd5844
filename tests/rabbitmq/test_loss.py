"""Nothing is lost when the worker is stopped mid-stream or RabbitMQ restarts under it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config.settings import Settings
from infra.rabbitmq import open_broker
from infra.rabbitmq.topology import Topology
from tests.contract.broker_contract import Ledger, eventually, make_dispatcher, publish_records, running
from tests.loss import POISON, POISON_BODIES, POISON_REASON, VALID, incidents, publish_all
from tests.rabbitmq.conftest import queue_depth
from tests.services import require
from tests.workers import env_of, sigterm, worker_process


def worker(
    settings: Settings, db: Path, log: Path, log_level: str = "warning"
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``python app.py worker`` on this test's topology and SQLite file; killed if the test fails."""
    names = ("rabbitmq_url", "rabbitmq_exchange", "rabbitmq_queue", "retry_backoff")
    env = env_of({"broker": "rabbitmq", "store": "sqlite", "sqlite_path": str(db), "log_level": log_level})
    return worker_process(env | env_of({n: getattr(settings, n) for n in names}), log)


@pytest.mark.slow
async def test_sigterm_mid_stream_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    """5,000 valid messages and 50 poison ones; the first worker is stopped with SIGTERM mid-stream and
    exits 0, a second worker finishes: 5,000 distinct incidents, main and retry queues empty, and the
    dead-letter queue holds exactly the 50 poison messages, each with its reason."""
    topology = Topology.from_settings(settings)
    db, log = tmp_path / "incidentd.db", tmp_path / "worker.log"
    work_queues = [topology.queue, *topology.retry_queues]
    async with open_broker(settings) as broker:
        await broker.setup()
        await publish_all(broker)

    with worker(settings, db, log) as first:
        await eventually(lambda: incidents(db)[0] >= 1_000, timeout=120)
        assert await sigterm(first) == 0, log.read_text()[-3000:]
    handled_by_first = incidents(db)[0]
    assert handled_by_first < VALID, "the first worker finished everything; nothing was stopped mid-stream"

    with worker(settings, db, log) as second:
        await eventually(lambda: incidents(db) == (VALID, VALID), timeout=180)
        await eventually(lambda: _zero(queue_depth(work_queues)), timeout=30)
        await eventually(lambda: _equals(queue_depth([topology.dlq]), POISON), timeout=30)
        assert await sigterm(second) == 0, log.read_text()[-3000:]

    assert incidents(db) == (VALID, VALID)
    assert await queue_depth(work_queues) == 0
    async with open_broker(settings) as broker:
        letters = await broker.dead_letters.list()
    assert sorted(letter.body for letter in letters) == sorted(POISON_BODIES)
    assert all(POISON_REASON in letter.reason for letter in letters)
    print(f"first worker handled {handled_by_first}, second the rest; dead letters {len(letters)}")


async def _zero(depth: asyncio.Future[int] | object) -> bool:
    return await depth == 0  # type: ignore[misc]


async def _equals(depth: object, value: int) -> bool:
    return await depth == value  # type: ignore[misc]


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"


@contextlib.asynccontextmanager
async def rabbitmq_app_stopped() -> AsyncIterator[None]:
    """Stop the RabbitMQ application (the node stays up) and always start it again, even if the test
    fails; if the node itself went down, start it with ``rabbitmq-server -detached``."""
    await rabbitmqctl("stop_app")
    try:
        yield
    finally:
        try:
            await rabbitmqctl("start_app")
        except Exception:
            await asyncio.to_thread(subprocess.run, ["rabbitmq-server", "-detached"], check=False)
        await rabbitmqctl("await_startup")


@pytest.mark.slow
async def test_broker_restart_while_consuming_loses_nothing(settings: Settings) -> None:
    """RabbitMQ's app is stopped and started while the worker consumes: the worker reconnects on its
    own, the messages that were unacked come back, and every message is handled; none is left or
    dead-lettered."""
    require(
        shutil.which("rabbitmqctl") is not None,
        "rabbitmqctl (a local RabbitMQ)",
        "bash .ci/install-rabbitmq.sh",
    )
    settings = settings.model_copy(update={"rabbitmq_url": settings.rabbitmq_url + "?reconnect_interval=1"})
    keys = [f"r{i}" for i in range(2_000)]
    ledger = Ledger()
    ledger.delay = 0.05  # about 160 messages/s: the restart lands mid-stream
    async with open_broker(settings) as broker:
        await broker.setup()
        await publish_records(broker, keys)
        async with running(broker, make_dispatcher(ledger, concurrency=8)) as stop:
            await eventually(lambda: len(ledger.effects) >= 300)
            async with rabbitmq_app_stopped():
                assert not broker.subscriber.connected
                handled_while_down = len(ledger.effects)
            await eventually(lambda: broker.subscriber.connected, timeout=60)
            await eventually(lambda: set(ledger.effects) == set(keys), timeout=120)
            await stop()
        assert await broker.dead_letters.list() == []
    assert await queue_depth([Topology.from_settings(settings).queue]) == 0
    assert handled_while_down < len(keys), "everything was handled before the restart; it proved nothing"
    print(
        f"handled before restart {handled_while_down}, duplicates {sum(ledger.effects.values()) - len(keys)}"
    )
