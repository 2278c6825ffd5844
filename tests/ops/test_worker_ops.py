"""The ops server wired into a running worker: what Kubernetes sees across a SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp

from application.commands import Command
from application.dispatcher import Context, Dispatcher, bind
from application.factory import CommandFactory
from application.worker import run_worker
from infra.memory import MemoryBroker
from infra.memory.dead_letters import MemoryDeadLetters
from infra.metrics import Metrics
from infra.ops import OpsServer
from tests.ops.conftest import ROOT
from tests.workers import free_port, get, sample


class Slow(Command):
    TYPE = "test.slow"


async def until(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Until ``condition()`` is true; the deadline is generous (a loaded CI machine starts a worker
    process in tens of seconds), the poll is short."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_readiness_drops_on_stop_while_the_in_flight_message_drains(tmp_path: Path) -> None:
    """On SIGTERM /readyz is 503 at once while a handler still runs; /healthz stays 200; nothing is lost."""
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(command: Slow, context: Context) -> None:
        started.set()
        await release.wait()

    metrics = Metrics(command_types=[Slow.TYPE])
    dispatcher = Dispatcher(
        CommandFactory([Slow]),
        bind({Slow: [handler]}, {}),
        concurrency=4,
        timeout=30,
        observers=[metrics.observe],
    )
    metrics.track_in_flight(lambda: dispatcher.in_flight)
    broker = MemoryBroker(await MemoryDeadLetters.open(tmp_path / "dlq.db"), prefetch=8)
    server = OpsServer(metrics.registry, port=0, checks={"broker": lambda: broker.subscriber.connected})
    stop = asyncio.Event()
    async with server:
        url = f"http://127.0.0.1:{server.port}"
        assert (await get(url + "/readyz"))[0] == 503, "not ready before it consumes"
        worker = asyncio.create_task(
            run_worker(
                broker.subscriber,
                dispatcher,
                stop=stop,
                shutdown_timeout=20,
                on_stopping=[server.mark_stopping],
            )
        )
        await broker.publisher.publish(b"{}", {"type": Slow.TYPE})
        await asyncio.wait_for(started.wait(), 10)
        assert (await get(url + "/readyz"))[0] == 200

        stop.set()  # what the SIGTERM handler does

        async def not_ready() -> bool:
            return (await get(url + "/readyz"))[0] == 503

        await until(not_ready, "/readyz 503")
        assert not worker.done(), "still draining"
        assert (await get(url + "/healthz"))[0] == 200
        metrics_text = (await get(url + "/metrics"))[1]
        assert sample(metrics_text, "incidentd_messages_in_flight") == 1

        release.set()
        report = await asyncio.wait_for(worker, 10)
        metrics.drained(report.seconds)
        metrics_text = (await get(url + "/metrics"))[1]
    await broker.close()
    assert report.cancelled == 0
    assert sample(metrics_text, "incidentd_messages_total", command_type=Slow.TYPE, outcome="ack") == 1
    assert sample(metrics_text, "incidentd_shutdown_drain_seconds") == report.seconds > 0


async def test_app_worker_serves_probes_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """`python app.py worker` answers /readyz and /metrics on the ops port (including the incidents
    already in the store) and exits 0 on SIGTERM."""
    port = free_port()
    env = {
        **os.environ,
        "INCIDENTD_OPS_HOST": "127.0.0.1",
        "INCIDENTD_OPS_PORT": str(port),
        "INCIDENTD_SQLITE_PATH": str(tmp_path / "incidentd.db"),
        "INCIDENTD_SHUTDOWN_TIMEOUT": "5",
    }
    seed = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", "worker", "--from", "examples/events.jsonl", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await seed.wait() == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", "worker", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}"

        async def ready() -> bool:
            assert proc.returncode is None, "the worker exited"
            try:
                return (await get(url + "/readyz"))[0] == 200
            except aiohttp.ClientConnectionError:
                return False

        await until(ready, "the worker's /readyz")

        async def incidents_read() -> bool:
            # The gauge is refreshed from the store in the background (every 15 s); ready does not wait
            # for its first read, so the test waits for it instead of assuming it came first.
            text = (await get(url + "/metrics"))[1]
            return (
                sample(text, "incidentd_incidents_active", severity="critical", service="checkout")
                is not None
            )

        await until(incidents_read, "the first read of the incidents-active gauge")
        metrics_text = (await get(url + "/metrics"))[1]
        for command_type in ("alertmanager.webhook", "incident.create", "unknown"):
            assert (
                sample(metrics_text, "incidentd_messages_total", command_type=command_type, outcome="ack")
                == 0
            )
        # examples/events.jsonl leaves the checkout alert on fingerprint d2e1… unresolved.
        assert (
            sample(metrics_text, "incidentd_incidents_active", severity="critical", service="checkout") == 1
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
