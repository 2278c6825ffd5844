"""The broker contract on the embedded (memory) broker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from application.ports import Broker
from infra.memory import MemoryBroker
from infra.sqlite.dead_letters import SqliteDeadLetters
from tests.contract.broker_contract import BrokerContract


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    async def open_broker(self) -> AsyncIterator[object]:
        broker = MemoryBroker(await SqliteDeadLetters.open(":memory:"), prefetch=16)

        @contextlib.asynccontextmanager
        async def connect() -> AsyncIterator[Broker]:
            # One in-process queue; each "connection" is the same broker with a fresh subscriber run.
            yield broker

        yield connect
        await broker.close()

    @pytest.fixture
    def backlog(self) -> object:
        async def count(broker: MemoryBroker) -> int:
            return broker.queue.outstanding

        return count
