"""Runs a delivery's handlers and decides its one outcome.

This module is the only place where an outcome is decided and settled:

* decode error or :class:`PermanentError`  -> DEAD_LETTER at once;
* :class:`TransientError` -> retried in-process with exponential backoff and jitter (tenacity), then RETRY
  with the redelivery delay of the backoff schedule (or the handler's ``retry_after``, at most
  ``settle.MAX_RETRY_DELAY``), or DEAD_LETTER once the delivery attempt reaches ``max_attempts``;
* a timeout (it covers the in-process retries) or any unexpected exception -> the same RETRY /
  DEAD_LETTER, without in-process retries (the stores map their connection errors to TransientError);
* cancellation (shutdown deadline) -> RETRY with no delay, settled under ``asyncio.shield``;
* a retry copy or redelivery of a message that already reached ACK or DEAD_LETTER (when the dispatcher
  has a ``SettledRecord``) -> ACK without running the handlers (``message.duplicate_dropped``);
* otherwise ACK.

Concurrency is bounded by a semaphore; deliveries waiting for a slot when draining starts are handed
back at once (RETRY, no delay) so that another worker can take them.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from application.commands import Command
from application.errors import DecodeError, PermanentError, TransientError
from application.factory import CommandFactory
from application.messages import Delivery, Disposition, Message, Outcome
from application.ports import ChangedIncident
from application.settle import DUPLICATE, SettledRecord, retry_delay, settle

log = structlog.get_logger("incidentd.dispatcher")

Handler = Callable[..., Awaitable[None]]
BoundHandler = Callable[[Command, "Context"], Awaitable[None]]
# Called after every settled delivery (metrics, event lake). Must be cheap and must not raise.
Observer = Callable[[Message, str, Outcome, float], None]
# Called once per delivery as soon as its command type is known ("unknown" if it cannot be decoded),
# before it runs: counts what arrived, including deliveries still running or never settled.
Receiver = Callable[[Message, str], None]


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may know about the message that carried its command."""

    message_id: str
    idempotency_key: str
    attempt: int
    # The record of the incidents this delivery's transactions changed, which the after-commit steps
    # run from (each pass of the handlers records it again).
    changes: list[ChangedIncident] = field(default_factory=list, compare=False)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff: Sequence[float] = (1.0, 5.0, 30.0, 120.0, 600.0)
    in_process_attempts: int = 3
    in_process_initial: float = 0.05
    in_process_max: float = 1.0

    def redelivery_delay(self, attempt: int) -> float:
        return self.backoff[min(attempt, len(self.backoff)) - 1]


def bind(
    handlers: Mapping[type[Command], Sequence[Handler]], dependencies: Mapping[str, Any]
) -> dict[type[Command], tuple[BoundHandler, ...]]:
    """Give each handler the dependencies its signature names, once, at start-up.

    A handler is ``async def handle(command, context, <dependency names...>)``. A name with no
    dependency is an error at start-up, not at the first message.
    """
    return {command: bind_all(hs, dependencies) for command, hs in handlers.items()}


def bind_all(handlers: Iterable[Handler], dependencies: Mapping[str, Any]) -> tuple[BoundHandler, ...]:
    """:func:`bind` for one list (the after-commit steps)."""
    return tuple(_bind_one(handler, dependencies) for handler in handlers)


def _bind_one(handler: Handler, dependencies: Mapping[str, Any]) -> BoundHandler:
    names = list(inspect.signature(handler).parameters)[2:]
    missing = [n for n in names if n not in dependencies]
    if missing:
        raise LookupError(f"{handler.__qualname__} needs {missing}, which nothing provides")
    return partial(handler, **{n: dependencies[n] for n in names})


class Dispatcher:
    def __init__(
        self,
        factory: CommandFactory,
        handlers: Mapping[type[Command], Sequence[BoundHandler]],
        *,
        concurrency: int,
        timeout: float,
        timeouts: Mapping[str, float] | None = None,
        retry: RetryPolicy = RetryPolicy(),
        observers: Iterable[Observer] = (),
        receivers: Iterable[Receiver] = (),
        after_commit: Sequence[BoundHandler] = (),
        settled: SettledRecord | None = None,
    ) -> None:
        """``after_commit``: steps run after every command's handlers, in the same attempt (a failure
        retries the whole list), from the record of what its transactions changed (``Context.changes``)."""
        self._factory = factory
        self._handlers = {command: (*hs, *after_commit) for command, hs in handlers.items()}
        self._timeout = timeout
        self._timeouts = dict(timeouts or {})
        self._retry = retry
        self._observers = tuple(observers)
        self._receivers = tuple(receivers)
        self._settled = settled  # a second live copy of a settled message is acked, not run again
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[Any]] = set()
        self._settling: set[asyncio.Task[Any]] = set()
        self._draining = False
        self.settle_failures = 0  # settles the broker did not take (read by /metrics)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def waiting(self) -> int:
        """Deliveries received but waiting for a concurrency slot (``in_flight`` counts them too)."""
        return len(self._waiting)

    def submit(self, delivery: Delivery) -> None:
        """Take a delivery from a subscriber; its outcome is settled by a task of its own."""
        task = asyncio.get_running_loop().create_task(self._process(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> int:
        """Stop starting handlers; wait up to ``timeout`` for running ones; cancel (and RETRY) the rest.

        Returns how many deliveries had to be cancelled. Every delivery is settled when this returns.
        """
        self._draining = True
        for task in list(self._waiting):
            task.cancel()
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        cancelled = [task for task in pending if task not in self._settling]
        for task in cancelled:  # a settle under way is never abandoned half-way: it is waited for
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return len(cancelled)

    async def _process(self, delivery: Delivery) -> None:
        """Every path ends in exactly one settle: a decode failure of any kind and unreadable attributes
        are a dead letter, cancellation a hand-back, any other exception a RETRY bounded by
        ``max_attempts``."""
        message = delivery.message
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        command_type = "unknown"
        bound = False  # the log context: bound once per message, in one call (it is on the hot path)
        try:
            if message.defect:
                raise DecodeError(message.defect)
            try:
                command = self._factory.decode(message)
            except DecodeError:
                raise
            except Exception as exc:  # a decoder bug or an input it did not expect: the message is bad
                raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
            command_type = command.TYPE
            structlog.contextvars.bind_contextvars(
                message_id=message.message_id, attempt=message.attempt, command_type=command_type
            )
            bound = True
            self._received(message, command_type)
            outcome = await self._run(command, message, task)
        except DecodeError as exc:
            bound = bound or _bind_message(message)
            self._received(message, command_type)
            outcome = Outcome.dead_letter(f"undecodable message: {exc}", error="DecodeError")
        except asyncio.CancelledError:
            bound = bound or _bind_message(message)
            outcome = Outcome.retry(0.0, "cancelled at shutdown before the handler finished")
            await self._finish(delivery, outcome, command_type, started, task)
            raise
        except Exception as exc:  # outside the handlers (their errors are outcomes already): a bug here
            bound = bound or _bind_message(message)
            log.exception("message.unexpected_error")
            error = type(exc).__name__
            outcome = self._transient(message.attempt, f"{error}: {exc}", error, None)
        await self._finish(delivery, outcome, command_type, started, task)

    def _received(self, message: Message, command_type: str) -> None:
        for receiver in self._receivers:
            try:
                receiver(message, command_type)
            except Exception:  # a metric must never change what happens to the message
                log.exception("message.receiver_failed")

    async def _run(self, command: Command, message: Message, task: asyncio.Task[Any]) -> Outcome:
        if self._draining:
            return Outcome.retry(0.0, "worker is shutting down; not started")
        self._waiting.add(task)
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            if not self._draining:
                raise
            task.uncancel()
            return Outcome.retry(0.0, "worker is shutting down; not started")
        finally:
            self._waiting.discard(task)
        try:
            if self._settled is not None and await self._settled.seen(message):
                return DUPLICATE
            # A message without a broker id is named by its idempotency key (a body digest), so that the
            # timeline entries it records can be found again on its redelivery (application/side_effects.py).
            message_id = message.message_id or message.idempotency_key
            context = Context(message_id, message.idempotency_key, message.attempt)
            timeout = self._timeouts.get(command.TYPE, self._timeout)
            return await self._attempt(command, context, timeout)
        finally:
            self._slots.release()

    async def _attempt(self, command: Command, context: Context, timeout: float) -> Outcome:
        try:
            async with asyncio.timeout(timeout):
                await self._call_handlers(command, context)
        except PermanentError as exc:
            return Outcome.dead_letter(f"permanent error: {exc}", error=type(exc).__name__)
        except TimeoutError:
            return self._transient(context.attempt, f"timed out after {timeout:g}s", "TimeoutError", None)
        except TransientError as exc:
            return self._transient(context.attempt, str(exc), type(exc).__name__, exc.retry_after)
        except Exception as exc:  # unexpected: never lose the message; bounded by max_attempts
            log.exception("handler.unexpected_error")
            return self._transient(context.attempt, f"{type(exc).__name__}: {exc}", type(exc).__name__, None)
        return Outcome.ack()

    async def _call_handlers(self, command: Command, context: Context) -> None:
        handlers = self._handlers[type(command)]
        try:
            await _run_all(handlers, command, context)
        except TransientError:
            # The happy path above pays nothing for tenacity; only a transient failure enters it.
            if self._retry.in_process_attempts <= 1:
                raise
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self._retry.in_process_attempts - 1),
                wait=wait_exponential_jitter(
                    multiplier=self._retry.in_process_initial,
                    max=self._retry.in_process_max,
                    jitter=self._retry.in_process_initial,
                ),
                retry=retry_if_exception_type(TransientError),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await _run_all(handlers, command, context)

    def _transient(self, attempt: int, error: str, error_type: str, retry_after: float | None) -> Outcome:
        if attempt >= self._retry.max_attempts:
            return Outcome.dead_letter(f"gave up after {attempt} attempts: {error}", error=error_type)
        delay = retry_delay(max(self._retry.redelivery_delay(attempt), retry_after or 0.0))
        return Outcome.retry(delay, error, error=error_type)

    async def _finish(
        self, delivery: Delivery, outcome: Outcome, command_type: str, started: float, task: asyncio.Task[Any]
    ) -> None:
        """Settle, and never abandon a settle half-way: :meth:`drain` (the only one that cancels these
        tasks) does not cancel a task that is settling, it waits for it. This protects the settle like
        ``asyncio.shield`` would, without a second task per message."""
        self._settling.add(task)
        try:
            await self._settle(delivery, outcome, command_type, started)
        finally:
            self._settling.discard(task)

    async def _settle(self, delivery: Delivery, outcome: Outcome, command_type: str, started: float) -> None:
        try:
            await settle(delivery, outcome)
        except Exception:
            # The broker did not take the outcome (e.g. the connection dropped). The delivery was not
            # acked, so the broker redelivers it: nothing is lost, and the store's idempotency record
            # makes the second run harmless.
            log.exception("message.settle_failed", outcome=outcome.disposition.value)
            self.settle_failures += 1
            return
        if self._settled is not None:
            await self._settled.record(delivery.message, outcome)
        duration = time.perf_counter() - started
        _log_outcome(outcome, round(duration * 1000, 3))
        for observer in self._observers:
            try:
                observer(delivery.message, command_type, outcome, duration)
            except Exception:
                log.exception("message.observer_failed")


async def _run_all(handlers: Sequence[BoundHandler], command: Command, context: Context) -> None:
    context.changes.clear()  # a retried pass records them again (its store handler finds its key processed)
    for handler in handlers:
        await handler(command, context)


def _bind_message(message: Message) -> bool:
    """The log context of a message that failed before (or while) its command type was known."""
    structlog.contextvars.bind_contextvars(message_id=message.message_id, attempt=message.attempt)
    return True


def _log_outcome(outcome: Outcome, duration_ms: float) -> None:
    if outcome is DUPLICATE:
        log.info("message.duplicate_dropped", duration_ms=duration_ms, reason=outcome.reason)
    elif outcome.disposition is Disposition.ACK:
        log.info("message.acked", duration_ms=duration_ms)
    elif outcome.disposition is Disposition.RETRY:
        log.warning("message.retry", duration_ms=duration_ms, delay=outcome.delay, reason=outcome.reason)
    else:
        log.error(
            "message.dead_lettered", duration_ms=duration_ms, reason=outcome.reason, error=outcome.error
        )
