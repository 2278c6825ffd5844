"""List latency of the incident API at 100,000 incidents in PostgreSQL: p50 / p99 per page.

    python -m tests.bench.api_bench [--incidents 100000] [--requests 200] [--keep]

Fills a schema of its own with ``--incidents`` incidents (50 services, 3 environments, 5 severities; 10%
unresolved; created over 90 days; whole documents with a timeline, as the worker writes them), ANALYZEs
it, then times ``GET /v1/incidents`` pages through the real application (make_app, a loopback port, an
aiohttp client in the same process, so the numbers include routing, validation, the query, parsing the
documents and the JSON answer) and, beside it, the store's ``search`` alone. Each scenario is asked
``--requests`` times (after 20 to warm up); the deep walk follows ``next_cursor`` 40 pages down. Then it
drops the schema (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident
from common.logging import configure_logging
from infra.memory.broker import MemoryPublisher, MemoryQueue
from infra.postgres.store import _UPSERT, PostgresStore, _row
from infra.web.api import ListParams
from infra.web.app import HttpDeps, make_app
from infra.web.auth import RateLimiter
from infra.web.metrics import HttpMetrics

PG_DSN = os.environ.get("INCIDENTD_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NOW = datetime.now(UTC)
SEVERITIES = ("critical", "high", "medium", "low", "info")
# One JSON line per request, as in production, to /dev/null (a global: the stream must outlive main()).
LOG = open(os.devnull, "w")  # noqa: SIM115
WORDS = ("latency", "errors", "disk", "memory", "timeouts", "restarts", "backlog", "certificate", "5xx")


def make(n: int, rng: random.Random) -> Incident:
    service, environment = f"svc-{rng.randrange(50)}", ("production", "staging", "dev")[rng.randrange(3)]
    at = NOW - timedelta(seconds=rng.randrange(90 * 86400))
    title = f"{service} {rng.choice(WORDS)} {rng.choice(WORDS)} on pod {service}-{n % 997}"
    incident = Incident.open(
        at=at, actor="alertmanager", message_id=f"bench-{n}", title=title, service=service,
        environment=environment, severity=SEVERITIES[rng.randrange(5)], source="alertmanager",
        dedup_key=f"bench:{n}", source_alert={"labels": {"alertname": title, "service": service}},
    )  # fmt: skip
    incident.correlation_group = str(incident.id)
    if rng.random() < 0.9:
        acked, resolved = timedelta(minutes=rng.randrange(1, 30)), timedelta(minutes=rng.randrange(30, 300))
        incident.acknowledge(at=at + acked, actor="oncall", message_id=f"a{n}")
        incident.resolve(at=at + resolved, actor="oncall", message_id=f"r{n}")
    return incident


async def fill(schema: str, count: int) -> None:
    rng = random.Random(15)
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        started = time.perf_counter()
        for start in range(0, count, 2000):
            rows = [_row(make(n, rng)) for n in range(start, min(count, start + 2000))]
            await conn.execute(_UPSERT, *(list(column) for column in zip(*rows, strict=True)))
        await conn.execute("ANALYZE incidents")
        print(f"filled {count:,} incidents in {time.perf_counter() - started:.1f}s")
    finally:
        await conn.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


async def timed(call: Callable[[], Awaitable[Any]], requests: int) -> tuple[float, float]:
    for _ in range(20):  # warm: prepared statements, the pool, the server's caches
        await call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--incidents", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the schema (its name is printed)")
    args = parser.parse_args()
    configure_logging("json", "info", stream=LOG)
    schema = f"api_bench_{uuid.uuid4().hex[:8]}"
    store = await PostgresStore.open(PG_DSN, schema=schema, min_size=2, max_size=4)
    try:
        await fill(schema, args.incidents)
        deps = HttpDeps(
            publisher=MemoryPublisher(MemoryQueue()), factory=CommandFactory(HANDLERS),
            metrics=HttpMetrics(CollectorRegistry()), tokens=None, limiter=RateLimiter(0, 1), store=store,
        )  # fmt: skip
        async with TestClient(TestServer(make_app(deps), host="127.0.0.1")) as client:
            cursor = ""
            for _ in range(40):  # the cursor of page 41
                page = await client.get("/v1/incidents?limit=50" + (f"&cursor={cursor}" if cursor else ""))
                cursor = (await page.json())["next_cursor"]
            scenarios = {
                "first page, no filter": "",
                "page 41 (cursor)": f"cursor={cursor}",
                "status=open": "status=open",
                "status=open,acknowledged": "status=open,acknowledged",
                "service=svc-7": "service=svc-7",
                "service=svc-7&status=resolved": "service=svc-7&status=resolved",
                "environment=staging&severity=critical": "environment=staging&severity=critical",
                "since=24h": "since=24h",
                "q=certificate (title text)": "q=certificate",
                "q=no-such-text (matches none)": "q=no-such-text",
            }
            print(f"\n{args.incidents:,} incidents, limit=50, {args.requests} requests each; milliseconds\n")
            print(f"| {'query':40} | HTTP p50 | HTTP p99 | store p50 | store p99 | items |")
            print(f"| {'-' * 40} | ---: | ---: | ---: | ---: | ---: |")
            for name, query in scenarios.items():
                path = f"/v1/incidents?limit=50&{query}"
                answer = await (await client.get(path)).json()

                async def http(path: str = path) -> None:
                    response = await client.get(path)
                    assert response.status == 200
                    await response.read()

                values = dict(p.split("=", 1) for p in query.split("&") if p)
                params = ListParams.model_validate({"limit": "50", **values})
                http50, http99 = await timed(http, args.requests)
                store50, store99 = await timed(
                    lambda params=params: store.search(params.query()), args.requests
                )
                row = f"{http50:.1f} | {http99:.1f} | {store50:.1f} | {store99:.1f} | {len(answer['items'])}"
                print(f"| {name:40} | {row} |")
    finally:
        await store.close()
        if args.keep:
            print(f"kept schema {schema}")
        else:
            conn = await asyncpg.connect(PG_DSN)
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
