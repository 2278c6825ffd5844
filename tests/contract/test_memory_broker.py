"""The broker contract on the embedded (memory) broker."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from application.dispatcher import Context, Dispatcher, bind
from application.factory import CommandFactory
from application.messages import ATTEMPT_ATTR, FIRST_SEEN_ATTR, REPLAYED_AT_ATTR, TYPE_ATTR
from application.ports import Broker, DeadLetter
from application.settle import SettledRecord
from infra.memory import MemoryBroker
from infra.memory.dead_letters import MemoryDeadLetters
from infra.sqlite.store import SqliteStore
from tests.contract.broker_contract import BrokerContract, Ledger, Record, make_dispatcher, running


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    async def open_broker(self) -> AsyncIterator[object]:
        broker = MemoryBroker(await MemoryDeadLetters.open(":memory:"), prefetch=16)

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


class FlakyDeadLetters(MemoryDeadLetters):
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
    broker = MemoryBroker(await MemoryDeadLetters.open(":memory:"), prefetch=4)
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


async def test_a_second_copy_of_a_settled_message_is_acked_without_running_but_a_replay_runs() -> None:
    """With the store's settled record: a retry copy (attempt 2) runs and is acked; a second live copy
    of it (same message id) is then acked without its handler running; a replay of the message (same
    id, a replay time) is a new message and runs."""
    broker = MemoryBroker(await MemoryDeadLetters.open(":memory:"), prefetch=4)
    store = await SqliteStore.open(":memory:")
    ledger = Ledger()

    async def record(cmd: Record, ctx: Context) -> None:
        await ledger.handle(cmd, ctx)

    dispatcher = Dispatcher(
        CommandFactory([Record]), bind({Record: [record]}, {}), concurrency=4, timeout=10,
        settled=SettledRecord(store),
    )  # fmt: skip
    copy = {TYPE_ATTR: Record.TYPE, ATTEMPT_ATTR: "2"}
    body = Record(key="k").model_dump_json().encode()
    try:
        with capture_logs() as logs:
            async with running(broker, dispatcher):
                for attributes in (copy, copy, copy | {REPLAYED_AT_ATTR: "2026-12-03T19:00:00+00:00"}):
                    await broker.publisher.publish(body, attributes, message_id="m-1")
                    await asyncio.wait_for(broker.wait_idle(), 10)
        assert ledger.effects["k"] == 2
        assert [e["event"] for e in logs if e["event"].startswith("message.")] == [
            "message.acked", "message.duplicate_dropped", "message.acked",
        ]  # fmt: skip
    finally:
        await broker.close()
        await store.close()
