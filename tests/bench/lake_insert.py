"""Event lake throughput against a throw-away clickhouse-server: the cost of record() on the event loop,
and rows per second ClickHouse takes in batches.

    python tests/bench/lake_insert.py [rows] [batch_size]
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from asynch import Connection

from application.messages import Message, Outcome
from infra.clickhouse import EventLake
from tests.lake.server import ClickHouseServer, binary


async def bench(server: ClickHouseServer, rows: int, batch_size: int) -> None:
    table = f"bench_{uuid.uuid4().hex[:8]}"

    def connect() -> Connection:
        return Connection(host=server.host, port=server.tcp_port, database="default")

    lake = EventLake(
        connect, database="default", table=table, broker="memory",
        batch_size=batch_size, flush_interval=3600, buffer_limit=rows,
    )  # fmt: skip
    messages = [
        Message(body=b'{"alert": "HighErrorRate", "n": %d}' % n, attributes={"type": "alertmanager.webhook"},
                message_id=f"m-{n}")
        for n in range(rows)
    ]  # fmt: skip
    started = time.perf_counter()
    for message in messages:
        lake.record(message, "alertmanager.webhook", Outcome.ack(), 0.002)
    recorded = time.perf_counter() - started
    started = time.perf_counter()
    await lake.start()
    await lake.close()  # flushes everything, batch by batch
    flushed = time.perf_counter() - started
    count = server.query(f"SELECT count() FROM default.{table}").strip()
    print(f"clickhouse {server.version()}: {rows} rows, batch {batch_size}")
    print(f"  record(): {recorded / rows * 1e6:.2f} us per call on the event loop")
    print(f"  insert:   {rows / flushed:,.0f} rows/s ({flushed:.2f} s), {count} rows in the table")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    executable = binary()
    if executable is None:
        sys.exit("clickhouse-server not installed: bash .ci/install-clickhouse.sh")
    server = ClickHouseServer(executable)
    server.start()
    try:
        asyncio.run(bench(server, rows, batch_size))
    finally:
        server.remove()


if __name__ == "__main__":
    main()
