"""The dispatcher: exactly one outcome per delivery, whatever the handler does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from application.commands import Command
from application.dispatcher import Context, Dispatcher, RetryPolicy, bind
from application.errors import PermanentError, TransientError
from application.factory import CommandFactory
from application.messages import ATTEMPT_ATTR, NOT_BEFORE_ATTR, Disposition, Message, Outcome
from application.settle import MAX_ATTEMPT, MAX_RETRY_DELAY, read_message


class Ping(Command):
    TYPE = "test.ping"
    n: int = 0


class FakeDelivery:
    """Records what ``application.settle`` asked the broker to do; settling twice is a failure.

    ``outcomes`` holds what the broker did, as an outcome: ACK for an ack alone, the copy's outcome for
    a copy then ack, RETRY with no delay for a requeue (a hand-back)."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.outcomes: list[Outcome] = []
        self.copies: list[dict[str, str]] = []
        self.settled = asyncio.Event()
        self._copied: Outcome | None = None

    async def ack(self) -> None:
        self._done(self._copied or Outcome.ack())

    async def requeue(self) -> None:
        self._done(Outcome.retry(0.0, "requeued"))

    async def publish_copy(self, attributes: Mapping[str, str], outcome: Outcome) -> None:
        self.copies.append(dict(attributes))
        self._copied = outcome

    def _done(self, outcome: Outcome) -> None:
        assert not self.outcomes, "settled twice"
        self.outcomes.append(outcome)
        self.settled.set()


def delivery(n: int = 0, attempt: int = 1, body: bytes | None = None) -> FakeDelivery:
    raw = body if body is not None else Ping(n=n).model_dump_json().encode()
    return FakeDelivery(Message(raw, {"type": Ping.TYPE}, f"msg-{n}", attempt=attempt))


def dispatcher(handler, *, concurrency=4, timeout=5.0, observers=(), **retry) -> Dispatcher:
    policy = RetryPolicy(
        **(
            {"max_attempts": 3, "backoff": (1.0, 5.0), "in_process_initial": 0.001, "in_process_max": 0.002}
            | retry
        )
    )
    return Dispatcher(
        CommandFactory([Ping]),
        bind({Ping: [handler]}, {}),
        concurrency=concurrency,
        timeout=timeout,
        retry=policy,
        observers=observers,
    )


async def outcome_of(d: Dispatcher, item: FakeDelivery) -> Outcome:
    d.submit(item)
    await asyncio.wait_for(item.settled.wait(), 5)
    [outcome] = item.outcomes
    return outcome


async def test_success_acks_and_tells_observers():
    """A handler that returns acks the delivery; observers see the command type and outcome."""
    seen = []

    async def handler(cmd: Ping, ctx: Context) -> None:
        seen.append((cmd.n, ctx.message_id, ctx.attempt))

    observed = []
    d = dispatcher(handler, observers=[lambda m, t, o, s: observed.append((t, o.disposition))])
    assert (await outcome_of(d, delivery(7))).disposition is Disposition.ACK
    assert seen == [(7, "msg-7", 1)]
    assert observed == [("test.ping", Disposition.ACK)]


async def test_undecodable_message_is_dead_lettered_without_calling_the_handler():
    """A message that is not a valid command is dead-lettered at once with the decode error as reason."""
    calls = []

    async def handler(cmd: Ping, ctx: Context) -> None:
        calls.append(cmd)

    outcome = await outcome_of(dispatcher(handler), delivery(body=b'{"n": "many"}'))
    assert outcome.disposition is Disposition.DEAD_LETTER
    assert "test.ping: n: Input should be a valid integer" in outcome.reason
    assert calls == []


async def test_permanent_error_dead_letters_on_first_attempt():
    """PermanentError dead-letters immediately, with the handler's message as the reason."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        raise PermanentError("deployment shop/checkout does not exist")

    outcome = await outcome_of(dispatcher(handler), delivery())
    assert outcome.disposition is Disposition.DEAD_LETTER
    assert "deployment shop/checkout does not exist" in outcome.reason


async def test_transient_error_retries_in_process_then_succeeds():
    """A transient failure is retried in-process with backoff; a later success acks."""
    calls = []

    async def handler(cmd: Ping, ctx: Context) -> None:
        calls.append(ctx.attempt)
        if len(calls) < 3:
            raise TransientError("connection reset")

    assert (
        await outcome_of(dispatcher(handler, in_process_attempts=3), delivery())
    ).disposition is Disposition.ACK
    assert len(calls) == 3


async def test_persistent_transient_error_asks_for_redelivery_with_backoff_delay():
    """Still failing after the in-process tries, the message is handed back with the schedule's delay."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        raise TransientError("503 from the API")

    d = dispatcher(handler, in_process_attempts=2)
    first = await outcome_of(d, delivery(attempt=1))
    second = await outcome_of(d, delivery(attempt=2))
    assert (first.disposition, first.delay) == (Disposition.RETRY, 1.0)
    assert (second.disposition, second.delay) == (Disposition.RETRY, 5.0)
    assert "503 from the API" in first.reason


async def test_retry_after_from_the_handler_lengthens_the_delay():
    """A handler's retry_after (e.g. from a 429) is honoured when longer than the schedule's delay."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        raise TransientError("throttled", retry_after=42)

    outcome = await outcome_of(dispatcher(handler, in_process_attempts=1), delivery())
    assert (outcome.disposition, outcome.delay) == (Disposition.RETRY, 42)


async def test_transient_error_dead_letters_once_attempts_are_exhausted():
    """At the last delivery attempt a transient failure dead-letters, saying how many attempts it took."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        raise TransientError("still down")

    outcome = await outcome_of(
        dispatcher(handler, max_attempts=3, in_process_attempts=1), delivery(attempt=3)
    )
    assert outcome.disposition is Disposition.DEAD_LETTER
    assert outcome.reason == "gave up after 3 attempts: still down"


async def test_timeout_is_a_transient_failure():
    """A handler exceeding the command timeout is abandoned and the message retried later."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        await asyncio.sleep(10)

    outcome = await outcome_of(dispatcher(handler, timeout=0.05), delivery())
    assert outcome.disposition is Disposition.RETRY
    assert "timed out after 0.05s" in outcome.reason


async def test_unexpected_exception_is_retried_not_lost():
    """A bug in a handler (any other exception) does not drop the message: it is retried, bounded."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        raise KeyError("oops")

    d = dispatcher(handler, in_process_attempts=1)
    assert (await outcome_of(d, delivery(attempt=1))).disposition is Disposition.RETRY
    assert (await outcome_of(d, delivery(attempt=3))).disposition is Disposition.DEAD_LETTER


async def test_semaphore_bounds_concurrent_handlers():
    """Never more than `concurrency` handlers run at once, and the bound is actually used."""
    running = 0
    peak = 0

    async def handler(cmd: Ping, ctx: Context) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    d = dispatcher(handler, concurrency=3)
    items = [delivery(i) for i in range(30)]
    for item in items:
        d.submit(item)
    await asyncio.wait_for(asyncio.gather(*(i.settled.wait() for i in items)), 5)
    assert peak == 3
    assert all(i.outcomes[0].disposition is Disposition.ACK for i in items)


async def test_drain_finishes_running_handlers_and_hands_back_waiting_ones():
    """On drain, handlers already running finish (ACK); deliveries still waiting for a slot are handed
    back at once (RETRY without delay) instead of being started."""
    release = asyncio.Event()

    async def handler(cmd: Ping, ctx: Context) -> None:
        await release.wait()

    d = dispatcher(handler, concurrency=2)
    items = [delivery(i) for i in range(5)]
    for item in items:
        d.submit(item)
    await asyncio.sleep(0.01)
    drain = asyncio.create_task(d.drain(5))
    await asyncio.sleep(0.01)
    release.set()
    assert await drain == 0
    dispositions = sorted(i.outcomes[0].disposition.value for i in items)
    assert dispositions == ["ack", "ack", "retry", "retry", "retry"]
    assert all(i.outcomes[0].delay == 0 for i in items if i.outcomes[0].disposition is Disposition.RETRY)


async def test_drain_deadline_cancels_and_retries_what_is_still_running():
    """A handler still running at the drain deadline is cancelled and its delivery handed back, once."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        await asyncio.sleep(60)

    d = dispatcher(handler)
    item = delivery()
    with capture_logs() as logs:
        d.submit(item)
        await asyncio.sleep(0.01)
        assert await d.drain(0.05) == 1
    [outcome] = item.outcomes
    assert outcome.disposition is Disposition.RETRY and outcome.delay == 0  # a requeue
    assert "cancelled at shutdown" in next(e["reason"] for e in logs if e["event"] == "message.retry")


async def test_settle_failure_is_logged_and_does_not_crash_the_worker():
    """If the broker cannot take the outcome (connection lost), the error is logged; the unacked message
    will be redelivered by the broker, and the dispatcher carries on."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        return None

    class Broken(FakeDelivery):
        async def ack(self) -> None:
            self.settled.set()
            raise ConnectionError("channel closed")

    d = dispatcher(handler)
    with capture_logs() as logs:
        item = Broken(delivery().message)
        d.submit(item)
        await item.settled.wait()
        await asyncio.sleep(0)
    assert [e["event"] for e in logs] == ["message.settle_failed"]
    assert (await outcome_of(d, delivery(2))).disposition is Disposition.ACK


async def test_one_log_line_per_outcome_carries_message_context():
    """Each outcome is logged once, with message_id, command_type, attempt and duration_ms."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        if cmd.n:
            raise PermanentError("no")

    d = dispatcher(handler)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await outcome_of(d, delivery(0, attempt=2))
        await outcome_of(d, delivery(1))
    assert [(e["event"], e["message_id"], e["command_type"], e["attempt"]) for e in logs] == [
        ("message.acked", "msg-0", "test.ping", 2),
        ("message.dead_lettered", "msg-1", "test.ping", 1),
    ]
    assert all(isinstance(e["duration_ms"], float) for e in logs)


def test_a_handler_asking_for_an_unknown_dependency_fails_at_start_up():
    """Wiring mistakes surface when the dispatcher is built, not at the first message."""

    async def handler(cmd: Ping, ctx: Context, pager: object) -> None: ...

    with pytest.raises(LookupError, match="needs \\['pager'\\]"):
        bind({Ping: [handler]}, {"store": object()})


async def test_a_message_without_an_id_is_named_by_its_idempotency_key():
    """Handlers of a message the broker gave no id see its idempotency key (a digest of the body) as its
    message id, so that the timeline entries it records are found again when it is redelivered."""
    seen = []

    async def handler(cmd: Ping, ctx: Context) -> None:
        seen.append((ctx.message_id, ctx.idempotency_key))

    item = FakeDelivery(Message(Ping(n=1).model_dump_json().encode(), {"type": Ping.TYPE}, ""))
    assert (await outcome_of(dispatcher(handler), item)).disposition is Disposition.ACK
    [(message_id, key)] = seen
    assert message_id == key and key.startswith("sha256:")


class ExplodingFactory(CommandFactory):
    """A decoder with a bug for some input (an ``aws.event`` whose source is a list once raised
    ``TypeError: unhashable``)."""

    def decode(self, message: Message) -> Command:
        raise TypeError("unhashable type: 'list'")


async def test_any_exception_from_decoding_is_one_dead_letter_with_the_reason():
    """Not only DecodeError: whatever a decoder raises, the delivery is settled once, as a dead letter
    naming the error (it used to stay unsettled, holding its prefetch slot until the channel closed)."""

    async def handler(cmd: Ping, ctx: Context) -> None: ...

    d = Dispatcher(ExplodingFactory([Ping]), bind({Ping: [handler]}, {}), concurrency=2, timeout=5)
    outcome = await outcome_of(d, delivery())
    assert outcome.disposition is Disposition.DEAD_LETTER
    assert "TypeError: unhashable type: 'list'" in outcome.reason


async def test_a_failing_receiver_or_observer_does_not_leave_the_delivery_unsettled():
    """A metric hook that raises is logged; the delivery still gets its one outcome."""

    async def handler(cmd: Ping, ctx: Context) -> None: ...

    def broken(*args: object) -> None:
        raise RuntimeError("metrics backend gone")

    d = Dispatcher(
        CommandFactory([Ping]), bind({Ping: [handler]}, {}), concurrency=2, timeout=5,
        receivers=[broken], observers=[broken],
    )  # fmt: skip
    with capture_logs() as logs:
        assert (await outcome_of(d, delivery())).disposition is Disposition.ACK
    events = [e["event"] for e in logs]
    assert "message.receiver_failed" in events and "message.observer_failed" in events


@pytest.mark.parametrize("retry_after", [3600.0, float("inf")])
async def test_a_long_retry_after_is_capped_at_the_one_maximum_delay(retry_after: float):
    """A handler asking to be retried in an hour (a GitHub rate limit) or never (``Retry-After: inf``)
    gets the longest redelivery delay every broker applies, ``MAX_RETRY_DELAY`` (600 s), and its copy is
    due then."""

    async def handler(cmd: Ping, ctx: Context) -> None:
        raise TransientError("rate limited", retry_after=retry_after)

    item = delivery()
    outcome = await outcome_of(dispatcher(handler, in_process_attempts=1), item)
    assert outcome.disposition is Disposition.RETRY and outcome.delay == MAX_RETRY_DELAY
    [copy] = item.copies
    assert float(copy[NOT_BEFORE_ATTR]) - time.time() == pytest.approx(MAX_RETRY_DELAY, abs=5)
    assert copy[ATTEMPT_ATTR] == "2"


async def test_a_40_digit_attempt_header_still_gives_one_json_log_line_per_outcome():
    """The attempt read from a message is clamped: a 40-digit ``x-incidentd-attempt`` is logged (and
    counted) like any other, instead of failing the JSON renderer ("Integer exceeds 64-bit range")."""

    async def handler(cmd: Ping, ctx: Context) -> None: ...

    message = read_message(
        Ping().model_dump_json().encode(), {"type": Ping.TYPE, ATTEMPT_ATTR: "9" * 40}, "m"
    )
    render = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        assert (await outcome_of(dispatcher(handler), FakeDelivery(message))).disposition is Disposition.ACK
    [line] = [e for e in logs if e["event"] == "message.acked"]
    assert json.loads(render(None, "info", dict(line)))["attempt"] == MAX_ATTEMPT
