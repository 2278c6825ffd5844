"""A private ClickHouse server for the session (tests/lake/server.py), and reading it back over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

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
