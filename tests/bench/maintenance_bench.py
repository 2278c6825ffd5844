"""What pruning processed_messages costs: rows deleted per second, how long each batch (one transaction)
takes, and how much it slows a handler recording idempotency keys at the same time.

    python -m tests.bench.maintenance_bench [--rows 1000000] [--batch-sizes 1000,5000,20000]
                                            [--stores postgres,sqlite]

For each store and batch size: a fresh table with ``--rows`` keys older than the retention plus a quarter
as many newer ones (key text like the real ones: a 32-hex message id and a suffix), then one
:class:`~infra.maintenance.Maintenance` pass, the way the worker or the CronJob runs it, timed batch by
batch. Meanwhile a writer inserts new keys one at a time (``INSERT ... ON CONFLICT DO NOTHING``, the
statement every message's transaction starts with); its latency during the prune is printed next to
the same writer's latency before it (the baseline), so "no long locks" is a number.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from infra.maintenance import Maintenance
from infra.sqlite.store import SqliteStore
from tests.bench.incidents_bench import DEVNULL, PG_DSN

RETENTION = timedelta(days=45)
NOW = datetime.now(UTC)


class Timed:
    """The store, with the duration of every prune batch recorded."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.batches: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def prune_processed(self, before: datetime, limit: int) -> int:
        started = time.perf_counter()
        deleted = int(await self._store.prune_processed(before, limit))
        self.batches.append(time.perf_counter() - started)
        return deleted


async def seed_postgres(store: Any, rows: int) -> None:
    async with store._pool.acquire() as conn:
        await conn.execute("TRUNCATE processed_messages")
        for start in range(0, rows, 200_000):  # old keys, spread over 45-90 days ago
            await conn.execute(
                "INSERT INTO processed_messages (key, processed_at) SELECT md5(g::text) || ':incident', "
                "now() - interval '45 days' - (g % 3888000) * interval '1 second' "
                "FROM generate_series($1::int, $2::int) AS g",
                start,
                min(start + 200_000, rows) - 1,
            )
        await conn.execute(
            "INSERT INTO processed_messages (key, processed_at) SELECT md5(g::text) || ':new', "
            "now() - (g % 3600000) * interval '1 second' FROM generate_series(1, $1::int) AS g",
            rows // 4,
        )
        await conn.execute("VACUUM ANALYZE processed_messages")


async def seed_sqlite(store: SqliteStore, rows: int) -> None:
    db = store._db
    await db.execute("DELETE FROM processed_messages")
    old = (NOW - timedelta(days=45, seconds=1)).isoformat()
    new = NOW.isoformat()
    await db.execute("BEGIN")
    await db.executemany(
        "INSERT INTO processed_messages (key, processed_at) VALUES (?, ?)",
        ((f"{uuid.uuid4().hex}:incident", old) for _ in range(rows)),
    )
    await db.executemany(
        "INSERT INTO processed_messages (key, processed_at) VALUES (?, ?)",
        ((f"{uuid.uuid4().hex}:new", new) for _ in range(rows // 4)),
    )
    await db.execute("COMMIT")


async def writer(store: Any, stop: asyncio.Event, latencies: list[float]) -> None:
    """One key at a time, as a message's transaction records it."""
    while not stop.is_set():
        started = time.perf_counter()
        async with store.transaction(f"{uuid.uuid4().hex}:writer"):
            pass
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.002)


async def writer_latency(store: Any, seconds: float) -> list[float]:
    stop, latencies = asyncio.Event(), []
    task = asyncio.create_task(writer(store, stop, latencies))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return latencies


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


async def one(name: str, store: Any, rows: int, batch: int) -> str:
    await (seed_postgres(store, rows) if name == "postgres" else seed_sqlite(store, rows))
    baseline = await writer_latency(store, 2.0)
    timed = Timed(store)
    stop, during = asyncio.Event(), []
    task = asyncio.create_task(writer(store, stop, during))
    started = time.perf_counter()
    report = await Maintenance(timed, processed_retention=RETENTION, batch_size=batch).run()
    seconds = time.perf_counter() - started
    stop.set()
    await task
    assert report.pruned == rows, (report.pruned, rows)
    return (
        f"| {name} | {rows:,} | {batch:,} | {seconds:.1f} | {rows / seconds:,.0f} | "
        f"{statistics.median(timed.batches) * 1000:.1f} / {max(timed.batches) * 1000:.1f} | "
        f"{ms(baseline, 0.5)} / {ms(baseline, 0.99)} | {ms(during, 0.5)} / {ms(during, 0.99)} / "
        f"{max(during) * 1000:.1f} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-sizes", default="1000,5000,20000")
    parser.add_argument("--stores", default="postgres,sqlite")
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(DEVNULL))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(
        "| store | old rows | batch | seconds | rows/s | batch ms p50 / max | "
        "writer ms before p50 / p99 | writer ms during p50 / p99 / max |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.stores.split(","):
        if name == "postgres":
            from infra.postgres.store import PostgresStore

            schema = f"bench_maintenance_{uuid.uuid4().hex[:8]}"
            store: Any = await PostgresStore.open(PG_DSN, schema=schema, min_size=2, max_size=4)
            try:
                for batch in batches:
                    print(await one(name, store, args.rows, batch), flush=True)
            finally:
                await store._pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
                await store.close()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                store = await SqliteStore.open(Path(tmp) / "bench.db")
                try:
                    for batch in batches:
                        print(await one(name, store, args.rows, batch), flush=True)
                finally:
                    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
