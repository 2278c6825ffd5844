"""The broker contract on the embedded (memory) broker."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from application.messages import FIRST_SEEN_ATTR
from application.ports import Broker, DeadLetter
from infra.memory import MemoryBroker
from infra.sqlite.dead_letters import SqliteDeadLetters
from tests.contract.broker_contract import BrokerContract, Ledger, make_dispatcher, running


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


class FlakyDeadLetters(SqliteDeadLetters):
    """The dead-letter store failing its first write (e.g. SQLite busy past its timeout, disk full)."""

    failures = 1

    async def add(self, letter: DeadLetter) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        await super().add(letter)


async def test_a_dead_letter_that_could_not_be_stored_is_handed_back_not_lost() -> None:
    """The dead-letter write fails: the message goes back to the queue (like RabbitMQ's nack when the
    dead-letter copy is not confirmed), is dead-lettered on its redelivery, and ``wait_idle`` (what
    ``worker --from`` waits for) returns instead of waiting for it forever."""
    broker = MemoryBroker(await FlakyDeadLetters.open(":memory:"), prefetch=4)
    try:
        await broker.publisher.publish(b"not json", {})
        async with running(broker, make_dispatcher(Ledger())):
            await asyncio.wait_for(broker.wait_idle(), 10)
        [letter] = await broker.dead_letters.list()
        assert letter.body == b"not json" and "undecodable" in letter.reason
    finally:
        await broker.close()


async def test_a_garbage_first_seen_time_does_not_stop_the_dead_letter_step() -> None:
    """A message carrying an unreadable ``x-incidentd-first-seen`` is dead-lettered once (its first-seen
    time is the publish time); the dead-letter step used to raise on it, hand the message back and
    loop (37,000 ``settle_failed`` lines in 10 s, ``worker --from`` never ending)."""
    broker = MemoryBroker(await SqliteDeadLetters.open(":memory:"), prefetch=4)
    try:
        await broker.publisher.publish(b"not json", {FIRST_SEEN_ATTR: "yesterday-ish"})
        with capture_logs() as logs:
            async with running(broker, make_dispatcher(Ledger())):
                await asyncio.wait_for(broker.wait_idle(), 10)
        [letter] = await broker.dead_letters.list()
        assert letter.first_seen is not None and "undecodable" in letter.reason
        assert not [e for e in logs if e["event"] == "message.settle_failed"]
    finally:
        await broker.close()
