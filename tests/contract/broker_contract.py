"""The broker contract: what every subscriber/publisher pair (memory, RabbitMQ, Pub/Sub) must do.

A broker's test module subclasses :class:`BrokerContract` and provides two fixtures:

* ``open_broker`` - a factory; each call returns an async context manager opening a new connection
  (a new Broker) on the *same* destinations, set up and empty at the start of the test. Its retry path
  must support redelivery delays of at least ``RETRY_BACKOFF``'s values (short, for tests).
* ``backlog`` - an async callable ``backlog(broker) -> int``: messages still waiting in the main and
  retry destinations (ready or unacked), dead letters not counted.

The tests run the real dispatcher and worker loop with a recording handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from application.commands import Command
from application.dispatcher import Context, Dispatcher, RetryPolicy, bind
from application.errors import TransientError
from application.factory import CommandFactory
from application.messages import ATTEMPT_ATTR, NOT_BEFORE_ATTR, TYPE_ATTR, Outcome
from application.ports import Broker
from application.worker import DrainReport, run_worker

RETRY_BACKOFF = (0.2, 0.4)
MAX_ATTEMPTS = 3

OpenBroker = Callable[[], AbstractAsyncContextManager[Broker]]
Backlog = Callable[[Broker], Awaitable[int]]


class Record(Command):
    TYPE = "contract.record"
    key: str


class Ledger:
    """What the recording handler saw, and how it should behave."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []  # (key, attempt) per handler call
        self.effects: Counter[str] = Counter()  # key -> times the handler completed
        self.fail_until: dict[str, int] = {}  # key -> raise TransientError while attempt < value
        self.delay = 0.0
        self.started = asyncio.Event()

    async def handle(self, cmd: Record, ctx: Context) -> None:
        self.calls.append((cmd.key, ctx.attempt))
        self.started.set()
        if ctx.attempt < self.fail_until.get(cmd.key, 0):
            raise TransientError(f"{cmd.key} is not ready (attempt {ctx.attempt})")
        if self.delay:
            await asyncio.sleep(self.delay)
        self.effects[cmd.key] += 1


def make_dispatcher(
    ledger: Ledger, outcomes: list[Outcome] | None = None, concurrency: int = 8
) -> Dispatcher:
    async def record(cmd: Record, ctx: Context) -> None:
        await ledger.handle(cmd, ctx)

    observers = [lambda m, t, o, d: outcomes.append(o)] if outcomes is not None else []
    return Dispatcher(
        CommandFactory([Record]),
        bind({Record: [record]}, {}),
        concurrency=concurrency,
        timeout=10,
        retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, backoff=RETRY_BACKOFF, in_process_attempts=1),
        observers=observers,
    )


async def publish_records(broker: Broker, keys: list[str]) -> None:
    for key in keys:
        await broker.publisher.publish(Record(key=key).model_dump_json().encode(), {TYPE_ATTR: Record.TYPE})


async def eventually(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(
    broker: Broker, dispatcher: Dispatcher, shutdown_timeout: float = 10.0
) -> AsyncIterator[Callable[[], Awaitable[DrainReport]]]:
    """Run a worker; the yielded ``stop()`` shuts it down (two-phase) and returns its drain report."""
    stop_event = asyncio.Event()
    task = asyncio.create_task(
        run_worker(broker.subscriber, dispatcher, stop=stop_event, shutdown_timeout=shutdown_timeout)
    )

    async def stop() -> DrainReport:
        stop_event.set()
        return await task

    try:
        yield stop
    finally:
        if not task.done():
            await stop()


class BrokerContract:
    async def test_published_messages_are_handled_once_and_acked(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """Every published message reaches its handler exactly once and nothing is left on the broker."""
        ledger = Ledger()
        keys = [f"m{i}" for i in range(50)]
        async with open_broker() as broker:
            await publish_records(broker, keys)
            async with running(broker, make_dispatcher(ledger)) as stop:
                await eventually(lambda: sum(ledger.effects.values()) == len(keys))
                await stop()
            assert ledger.effects == Counter(keys)
            await eventually(lambda: _is_zero(backlog(broker)))
            assert await broker.dead_letters.list() == []

    async def test_failing_message_is_redelivered_with_next_attempt_then_dead_lettered(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """A handler that keeps failing sees attempts 1..max, then the message is dead-lettered with the
        reason and the attempt count; the other messages are unaffected."""
        ledger = Ledger()
        ledger.fail_until["bad"] = 99
        async with open_broker() as broker:
            await publish_records(broker, ["bad", "good"])
            async with running(broker, make_dispatcher(ledger)) as stop:
                await eventually(lambda: _listed(broker, 1))
                await stop()
            assert [a for k, a in ledger.calls if k == "bad"] == list(range(1, MAX_ATTEMPTS + 1))
            assert ledger.effects == Counter({"good": 1})
            [letter] = await broker.dead_letters.list()
            assert "bad is not ready" in letter.reason
            assert letter.attempts == MAX_ATTEMPTS
            assert Record.model_validate_json(letter.body).key == "bad"
            await eventually(lambda: _is_zero(backlog(broker)))

    async def test_transient_failure_then_success_is_acked_after_redelivery(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """A message whose handler fails once succeeds on its redelivery and is not dead-lettered."""
        ledger = Ledger()
        ledger.fail_until["flaky"] = 2
        async with open_broker() as broker:
            await publish_records(broker, ["flaky"])
            async with running(broker, make_dispatcher(ledger)) as stop:
                await eventually(lambda: ledger.effects["flaky"] == 1)
                await stop()
            assert ledger.calls == [("flaky", 1), ("flaky", 2)]
            assert await broker.dead_letters.list() == []
            await eventually(lambda: _is_zero(backlog(broker)))

    async def test_poison_message_is_dead_lettered_at_once_with_reason(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """An undecodable message goes to the dead-letter destination on its first delivery, with a reason
        that says what is wrong, and is never redelivered."""
        ledger = Ledger()
        outcomes: list[Outcome] = []
        async with open_broker() as broker:
            await broker.publisher.publish(b"{not json", {TYPE_ATTR: Record.TYPE})
            await broker.publisher.publish(b'{"key": 1}', {TYPE_ATTR: Record.TYPE})
            await broker.publisher.publish(b'{"key": "x"}', {TYPE_ATTR: "no.such.type"})
            async with running(broker, make_dispatcher(ledger, outcomes)) as stop:
                await eventually(lambda: _listed(broker, 3))
                await asyncio.sleep(max(RETRY_BACKOFF) * 2)  # room for a wrongful redelivery
                await stop()
            assert ledger.calls == []
            assert len(outcomes) == 3  # one outcome each: no redelivery
            reasons = sorted(letter.reason for letter in await broker.dead_letters.list())
            assert any("not valid JSON" in r for r in reasons), reasons
            assert any("key: Input should be a valid string" in r for r in reasons), reasons
            assert any("unknown command type 'no.such.type'" in r for r in reasons), reasons
            assert all(letter.attempts == 1 for letter in await broker.dead_letters.list())
            await eventually(lambda: _is_zero(backlog(broker)))

    async def test_shutdown_drains_in_flight_work_and_loses_nothing(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """Stopping a worker mid-stream lets running handlers finish, hands unstarted messages back, and
        a second worker completes the rest: every message's effect exists exactly once."""
        ledger = Ledger()
        ledger.delay = 0.2
        keys = [f"s{i}" for i in range(40)]
        async with open_broker() as broker:
            await publish_records(broker, keys)
            async with running(broker, make_dispatcher(ledger, concurrency=4)) as stop:
                await ledger.started.wait()
                report = await stop()
            first_run = sum(ledger.effects.values())
            assert report.cancelled == 0  # everything started finished within the shutdown timeout
            assert 0 < first_run < len(keys)
        async with open_broker() as broker:
            async with running(broker, make_dispatcher(ledger, concurrency=8)) as stop:
                await eventually(lambda: sum(ledger.effects.values()) >= len(keys))
                await asyncio.sleep(0.3)  # room for a wrongful duplicate
                await stop()
            assert ledger.effects == Counter(keys)
            await eventually(lambda: _is_zero(backlog(broker)))

    async def test_shutdown_deadline_cancels_and_requeues_slow_handlers(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """A handler still running at the shutdown deadline is cancelled and its message handed back, not
        lost: the next worker handles it."""
        ledger = Ledger()
        ledger.delay = 30
        async with open_broker() as broker:
            await publish_records(broker, ["slow"])
            async with running(broker, make_dispatcher(ledger), shutdown_timeout=0.2) as stop:
                await ledger.started.wait()
                report = await stop()
            assert report.cancelled == 1
            assert ledger.effects == Counter()
        ledger.delay = 0
        async with open_broker() as broker:
            async with running(broker, make_dispatcher(ledger)) as stop:
                await eventually(lambda: ledger.effects["slow"] == 1)
                await stop()
            assert await broker.dead_letters.list() == []
            await eventually(lambda: _is_zero(backlog(broker)))

    async def test_a_hand_back_at_shutdown_is_not_an_attempt(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """Deliveries still waiting for a handler slot when a worker stops are handed back, and the next
        worker runs them at attempt 1: a rolling restart never brings a message closer to its dead
        letter (a hand-back used to count as an attempt on every broker)."""
        ledger = Ledger()
        ledger.delay = 0.3
        keys = [f"h{i}" for i in range(10)]
        async with open_broker() as broker:
            await publish_records(broker, keys)
            async with running(broker, make_dispatcher(ledger, concurrency=1)) as stop:
                await ledger.started.wait()
                await stop()
            assert 0 < sum(ledger.effects.values()) < len(keys)
        ledger.delay = 0
        async with open_broker() as broker:
            async with running(broker, make_dispatcher(ledger)) as stop:
                await eventually(lambda: sum(ledger.effects.values()) >= len(keys))
                await stop()
            assert ledger.effects == Counter(keys)
            assert {attempt for _, attempt in ledger.calls} == {1}
            await eventually(lambda: _is_zero(backlog(broker)))

    async def test_unreadable_numbers_in_attributes_are_one_dead_letter_each(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """An attempt attribute that is not a whole number, or a not-before that is not a finite number
        (``Retry-After: inf`` once became one), makes that message one dead letter naming the attribute,
        on its first delivery. A 40-digit attempt is clamped, not an error. The valid messages published
        with them are handled once each."""
        ledger = Ledger()
        outcomes: list[Outcome] = []
        hostile = {
            "a-float": {ATTEMPT_ATTR: "2.0"},
            "a-word": {ATTEMPT_ATTR: "abc"},
            "a-huge-float": {ATTEMPT_ATTR: "1e309"},
            "nb-inf": {NOT_BEFORE_ATTR: "inf"},
            "nb-word": {NOT_BEFORE_ATTR: "soon"},
        }
        async with open_broker() as broker:
            for key, attributes in hostile.items():
                body = Record(key=key).model_dump_json().encode()
                await broker.publisher.publish(body, {TYPE_ATTR: Record.TYPE, **attributes})
            await broker.publisher.publish(
                Record(key="big").model_dump_json().encode(), {TYPE_ATTR: Record.TYPE, ATTEMPT_ATTR: "9" * 40}
            )
            await publish_records(broker, ["ok1", "ok2"])
            async with running(broker, make_dispatcher(ledger, outcomes)) as stop:
                await eventually(lambda: _listed(broker, len(hostile)))
                await eventually(lambda: len(outcomes) == len(hostile) + 3)
                await stop()
            assert ledger.effects == Counter(["big", "ok1", "ok2"])
            letters = {Record.model_validate_json(x.body).key: x for x in await broker.dead_letters.list()}
            assert set(letters) == set(hostile)
            for key, attributes in hostile.items():
                [name] = attributes
                assert f"unreadable attribute {name}" in letters[key].reason, letters[key].reason
                assert letters[key].attempts == 1
            await eventually(lambda: _is_zero(backlog(broker)))

    async def test_dead_letter_copies_of_one_message_are_listed_once_with_their_count(
        self, open_broker: OpenBroker, backlog: Backlog
    ) -> None:
        """Two dead-letter copies of one message id (what a worker killed between the copy's confirm and
        the original's ack leaves behind) are one entry in ``dlq list``, with ``copies == 2``; other
        dead letters are unaffected."""
        outcomes: list[Outcome] = []
        async with open_broker() as broker:
            for message_id in ("twice", "twice", "once"):
                await broker.publisher.publish(b"{not json", {TYPE_ATTR: Record.TYPE}, message_id=message_id)
            async with running(broker, make_dispatcher(Ledger(), outcomes)) as stop:
                await eventually(lambda: len(outcomes) == 3)
                await eventually(lambda: _listed(broker, 2))
                await stop()
            letters = await broker.dead_letters.list()
            assert sorted((x.message_id, x.copies) for x in letters) == [("once", 1), ("twice", 2)]
            await eventually(lambda: _is_zero(backlog(broker)))


async def _listed(broker: Broker, count: int) -> bool:
    return len(await broker.dead_letters.list()) >= count


async def _is_zero(value: Awaitable[int]) -> bool:
    return await value == 0


@pytest.fixture
def contract_names() -> str:
    """A unique suffix for destinations, so parallel runs never share a queue or topic."""
    import uuid

    return uuid.uuid4().hex[:10]
