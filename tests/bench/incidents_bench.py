"""Alertmanager batches through the worker path into PostgreSQL and SQLite: alerts/s, handler latency.

    python -m tests.bench.incidents_bench [--batches 2000] [--stores postgres,sqlite]

One process, the production path: memory broker -> subscriber -> dispatcher (semaphore, timeout,
retries) -> the real ``alertmanager_webhook`` handler -> store, with JSON logging of every outcome (to
/dev/null). Each batch holds 10 alerts drawn from 2,000 fingerprints over 20 services (so most alerts
count occurrences on open incidents, some open new ones, ~10% resolve). Handler latency is the time inside
the handler (waiting for a pool connection and locks included), per batch message. "Alerts per worker
CPU-second" divides by the worker process's own CPU time: on a shared machine it shows what one core
would do, where the wall-clock rate shows what the machine did. For PostgreSQL the CPU time of the pool's
server backends (read from /proc: the server runs on the same machine here) is printed too, and "alerts
per CPU-second" divides by worker plus server time - what one worker costs the machine in all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from application.commands import AlertmanagerWebhook
from application.dispatcher import Dispatcher, RetryPolicy, bind
from application.factory import CommandFactory
from application.handlers import HANDLERS, alertmanager_webhook
from application.incidents import IncidentPolicy
from application.messages import TYPE_ATTR
from application.worker import run_worker
from common.logging import configure_logging
from infra.memory import MemoryBroker
from infra.memory.dead_letters import MemoryDeadLetters
from infra.sqlite.store import SqliteStore
from tests.standins.noop_actions import adapters_off

PG_DSN = os.environ.get("INCIDENTD_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
# The server's CPU is read from /proc only when it runs on this machine.
LOCAL_SERVER = Path("/proc/self/stat").exists() and "@127.0.0.1" in PG_DSN
T0 = datetime(2026, 11, 23, 10, tzinfo=UTC)
DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - every outcome is logged here, as in production, for the process's life


def batches(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        alerts = []
        for fingerprint in rng.sample(range(2000), 10):
            service = f"svc-{fingerprint % 20}"
            at = T0 + timedelta(seconds=n)
            resolved = rng.random() < 0.1
            alerts.append({
                "status": "resolved" if resolved else "firing",
                "labels": {"alertname": "HighLatency", "job": service, "env": "production",
                           "severity": "high",
                           "instance": f"pod-{fingerprint}"},
                "annotations": {"summary": f"{service} latency high on pod-{fingerprint}",
                                "runbook_url": f"https://runbooks.example.com/{service}"},
                "startsAt": (at - timedelta(seconds=30)).isoformat(),
                "endsAt": at.isoformat() if resolved else "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph", "fingerprint": f"{fingerprint:016x}",
            })  # fmt: skip
        out.append(json.dumps({
            "version": "4", "groupKey": f"{{}}:{{alertname=\"HighLatency\",batch=\"{n}\"}}",
            "status": "firing",
            "receiver": "incidentd", "groupLabels": {"alertname": "HighLatency"},
            "commonLabels": {"alertname": "HighLatency", "env": "production"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": alerts,
        }).encode())  # fmt: skip
    return out


@asynccontextmanager
async def postgres(pool_max: int) -> AsyncIterator[Any]:
    import asyncpg

    from infra.postgres.store import PostgresStore

    schema = f"incidents_bench_{uuid.uuid4().hex[:8]}"
    store = await PostgresStore.open(PG_DSN, schema=schema, min_size=pool_max, max_size=pool_max)
    try:
        yield store
    finally:
        await store.close()
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def backend_pids(store: Any) -> list[int]:
    """The server processes behind the PostgreSQL store's pool (min size = max size: all of them)."""
    pool = store._pool  # a benchmark looks inside
    connections = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        return [conn.get_server_pid() for conn in connections]
    finally:
        for conn in connections:
            await pool.release(conn)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these local processes (fields 14 and 15 of /proc/PID/stat, in clock ticks)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def sqlite(directory: Path) -> AsyncIterator[Any]:
    store = await SqliteStore.open(directory / "bench.db")
    try:
        yield store
    finally:
        await store.close()


async def run(
    store: Any, bodies: list[bytes], concurrency: int, directory: Path
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    deps = {"store": store, "policy": IncidentPolicy(), **adapters_off()}
    bound = bind({AlertmanagerWebhook: [alertmanager_webhook]}, deps)[AlertmanagerWebhook][0]
    bound_handlers = {**bind(HANDLERS, deps), AlertmanagerWebhook: (_timing(bound, latencies),)}
    dispatcher = Dispatcher(CommandFactory(HANDLERS), bound_handlers, concurrency=concurrency, timeout=30,
                            retry=RetryPolicy())  # fmt: skip
    broker = MemoryBroker(await MemoryDeadLetters.open(directory / "dlq.db"), prefetch=concurrency * 2)
    for body in bodies:
        await broker.publisher.publish(body, {TYPE_ATTR: "alertmanager.webhook"})
    stop = asyncio.Event()
    started = time.perf_counter()
    waiter = asyncio.create_task(broker.wait_idle())
    waiter.add_done_callback(lambda _: stop.set())
    try:
        await run_worker(broker.subscriber, dispatcher, stop=stop, shutdown_timeout=30)
    finally:
        elapsed = time.perf_counter() - started
        await broker.close()
    return elapsed, latencies


def _timing(handler: Callable[..., Any], latencies: list[float]) -> Callable[..., Any]:
    async def timed(cmd: Any, ctx: Any) -> None:
        started = time.perf_counter()
        await handler(cmd, ctx)
        latencies.append(time.perf_counter() - started)

    return timed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--stores", default="postgres,sqlite")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool", type=int, default=10, help="PostgreSQL pool size")
    args = parser.parse_args()
    configure_logging("json", "info", stream=DEVNULL)
    bodies = batches(args.batches)
    print(f"{args.batches} batches x 10 alerts, concurrency {args.concurrency}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| store | alerts | seconds | alerts/s | alerts per worker CPU-second | server CPU s "
          "| alerts per CPU-second (worker + server) | batch p50 ms | batch p99 ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.stores.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            opened = postgres(args.pool) if name == "postgres" else sqlite(Path(tmp))
            async with opened as store:
                pids = await backend_pids(store) if name == "postgres" and LOCAL_SERVER else []
                cpu, server = time.process_time(), cpu_seconds(pids)
                elapsed, latencies = await run(store, bodies, args.concurrency, Path(tmp))
                cpu, server = time.process_time() - cpu, cpu_seconds(pids) - server
                incidents = len(await store.list(limit=100_000))
        q = statistics.quantiles(latencies, n=100)
        alerts = 10 * len(bodies)
        both = f"{alerts / (cpu + server):,.0f}" if pids else "-"
        print(f"| {name} | {alerts} | {elapsed:.2f} | {alerts / elapsed:,.0f} | {alerts / cpu:,.0f} | "
              f"{f'{server:.2f}' if pids else '-'} | {both} | {q[49] * 1000:.1f} | "
              f"{q[98] * 1000:.1f} |  ({len(latencies)} batches handled, {incidents} incidents)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
