from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from infra.clickhouse import EventLake
from tests.lake.server import ClickHouseServer, binary
from tests.services import require


@pytest.fixture(scope="session")
def clickhouse() -> Iterator[ClickHouseServer]:
    """One ClickHouse server for the session, started from Debian's package in a temp dir."""
    executable = binary()
    require(executable is not None, "clickhouse-server", "bash .ci/install-clickhouse.sh")
    assert executable is not None
    server = ClickHouseServer(executable)
    server.start()
    yield server
    server.remove()


@pytest.fixture
def table() -> str:
    """A table name no other test (or helper on this machine) uses."""
    return f"events_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_lake(clickhouse: ClickHouseServer, table: str) -> AsyncIterator[Any]:
    """Builds started lakes writing to ``table``; closes them at the end even if a test fails."""
    from asynch import Connection

    lakes: list[EventLake] = []

    async def make(**options: Any) -> EventLake:
        timeout = options.pop("timeout", 5.0)

        def connect() -> Connection:
            return Connection(
                host=clickhouse.host,
                port=clickhouse.tcp_port,
                database="default",
                connect_timeout=timeout,
                send_receive_timeout=timeout,
            )

        lake = EventLake(
            connect, database="default", table=table, broker="memory", timeout=timeout, **options
        )
        await lake.start()
        lakes.append(lake)
        return lake

    yield make
    clickhouse.resume()
    for lake in lakes:
        await lake.close()


async def select(server: ClickHouseServer, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts, read over ClickHouse's HTTP interface (not through the code under test)."""
    text = await asyncio.to_thread(server.query, sql + " FORMAT JSONEachRow")
    return [json.loads(line) for line in text.splitlines() if line]


async def wait_for_rows(server: ClickHouseServer, table: str, count: int, within: float = 15.0) -> int:
    """Poll (bounded) until ``table`` holds ``count`` rows; return the last count seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    seen = -1
    while loop.time() < deadline:
        exists = await select(server, f"EXISTS TABLE default.{table}")
        if exists and next(iter(exists[0].values())) in (1, "1"):
            seen = int((await select(server, f"SELECT count() AS n FROM default.{table}"))[0]["n"])
            if seen >= count:
                return seen
        await asyncio.sleep(0.05)
    return seen
