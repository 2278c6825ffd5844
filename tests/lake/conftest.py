"""The event lake's fixtures; the ClickHouse server itself is tests/standins/clickhouse.py's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from infra.clickhouse import EventLake
from tests.lake.server import ClickHouseServer


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
