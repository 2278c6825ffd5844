"""Nothing is lost when the worker process is stopped mid-stream, and a handler that outlives the
subscription's ack deadline keeps its lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from application.commands import CreateIncident
from application.dispatcher import Context, Dispatcher, RetryPolicy, bind
from application.factory import CommandFactory
from application.messages import TYPE_ATTR
from config.settings import Settings
from infra.pubsub import open_broker
from tests.contract.broker_contract import Record, eventually, publish_records, running
from tests.pubsub.conftest import waiting

ROOT = Path(__file__).resolve().parents[2]
VALID, POISON = 5_000, 50


@contextlib.contextmanager
def worker(settings: Settings, db: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python app.py worker`` on this test's topology and SQLite file (PUBSUB_EMULATOR_HOST comes from
    the session); killed if the test fails."""
    env = os.environ | {
        "INCIDENTD_BROKER": "pubsub",
        "INCIDENTD_STORE": "sqlite",
        "INCIDENTD_SQLITE_PATH": str(db),
        "INCIDENTD_PUBSUB_PROJECT": settings.pubsub_project,
        "INCIDENTD_PUBSUB_TOPIC": settings.pubsub_topic,
        "INCIDENTD_PUBSUB_SUBSCRIPTION": settings.pubsub_subscription,
        "INCIDENTD_PUBSUB_ACK_DEADLINE": str(settings.pubsub_ack_deadline),
        "INCIDENTD_PUBSUB_MAX_LEASE_EXTENSION": str(settings.pubsub_max_lease_extension),
        "INCIDENTD_PUBSUB_RETRY_MIN_BACKOFF": "0",
        "INCIDENTD_PUBSUB_RETRY_MAX_BACKOFF": "0",
        "INCIDENTD_RETRY_BACKOFF": str(settings.retry_backoff),
        "INCIDENTD_OPS_HOST": "127.0.0.1",
        "INCIDENTD_OPS_PORT": "0",
        "INCIDENTD_LOG_LEVEL": "warning",
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py", "worker"], cwd=ROOT, env=env, stderr=out, stdout=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def incidents(db: Path) -> tuple[int, int]:
    """(incidents, distinct dedup keys) in the worker's store."""
    if not db.exists():
        return 0, 0
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return conn.execute("SELECT COUNT(*), COUNT(DISTINCT dedup_key) FROM incidents").fetchone()
        except sqlite3.OperationalError:  # schema not created yet, or busy
            return 0, 0


async def publish_all(settings: Settings) -> None:
    async with open_broker(settings) as broker:
        await broker.setup()
        bodies = [
            CreateIncident(title=f"disk full {i}", dedup_key=f"loss-{i}").model_dump_json().encode()
            for i in range(VALID)
        ]
        bodies += [f'{{"title": "", "dedup_key": "poison-{i}"}}'.encode() for i in range(POISON)]
        for start in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    broker.publisher.publish(b, {TYPE_ATTR: CreateIncident.TYPE})
                    for b in bodies[start : start + 500]
                )
            )


async def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and the exit code once the worker has drained (at most 60 s)."""
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(asyncio.to_thread(process.wait), 60)


@pytest.mark.slow
async def test_sigterm_mid_stream_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    """5,000 valid messages and 50 poison ones; the first worker is stopped with SIGTERM mid-stream and
    exits 0, a second worker finishes: 5,000 distinct incidents, nothing left on the subscription, and
    the dead-letter subscription holds exactly the 50 poison messages, each with its reason."""
    db, log = tmp_path / "incidentd.db", tmp_path / "worker.log"
    await publish_all(settings)

    with worker(settings, db, log) as first:
        await eventually(lambda: incidents(db)[0] >= 1_000, timeout=120)
        assert await stop(first) == 0, log.read_text()[-3000:]
    handled_by_first = incidents(db)[0]
    assert handled_by_first < VALID, "the first worker finished everything; nothing was stopped mid-stream"

    with worker(settings, db, log) as second:
        await eventually(lambda: incidents(db) == (VALID, VALID), timeout=180)
        async with open_broker(settings) as broker:
            await eventually(lambda: _count(broker.dead_letters.list(), POISON), timeout=30)
        assert await stop(second) == 0, log.read_text()[-3000:]

    assert incidents(db) == (VALID, VALID)
    assert await waiting(settings_path(settings)) == 0
    async with open_broker(settings) as broker:
        letters = await broker.dead_letters.list()
    assert sorted(letter.body for letter in letters) == sorted(
        f'{{"title": "", "dedup_key": "poison-{i}"}}'.encode() for i in range(POISON)
    )
    assert all("title: String should have at least 1 character" in letter.reason for letter in letters)
    print(f"first worker handled {handled_by_first}, second the rest; dead letters {len(letters)}")


def settings_path(settings: Settings) -> str:
    return f"projects/{settings.pubsub_project}/subscriptions/{settings.pubsub_subscription}"


async def _count(letters: object, expected: int) -> bool:
    return len(await letters) == expected  # type: ignore[misc]


@pytest.mark.slow
async def test_a_handler_slower_than_the_ack_deadline_completes_once(settings: Settings) -> None:
    """The subscription's ack deadline is 10 s and the handler takes 25 s: the client keeps extending
    the lease, so the message is neither redelivered while it runs nor after it is acked."""
    assert settings.pubsub_ack_deadline == 10
    calls: Counter[str] = Counter()
    done: Counter[str] = Counter()

    async def slow(cmd: Record, ctx: Context) -> None:
        calls[cmd.key] += 1
        await asyncio.sleep(25)
        done[cmd.key] += 1

    dispatcher = Dispatcher(
        CommandFactory([Record]), bind({Record: [slow]}, {}), concurrency=4, timeout=60,
        retry=RetryPolicy(in_process_attempts=1),
    )  # fmt: skip
    async with open_broker(settings) as broker:
        await broker.setup()
        await publish_records(broker, ["slow"])
        async with running(broker, dispatcher) as stop_worker:
            await eventually(lambda: done["slow"] == 1, timeout=60)
            await asyncio.sleep(12)  # past one more ack deadline: room for a wrongful redelivery
            await stop_worker()
        assert calls == Counter({"slow": 1})
        assert done == Counter({"slow": 1})
        assert await waiting(broker.topology.subscription_path) == 0
        assert await broker.dead_letters.list() == []
