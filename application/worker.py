"""The worker's life: consume until told to stop, then shut down in two phases, within one budget.

1. Stop taking work: readiness turns false and the subscriber stops handing deliveries over.
2. Drain: running handlers get the drain share of the budget to finish; whatever is still running
   then is cancelled and handed back (RETRY, no delay). A settle under way (a retry or dead-letter copy
   being published) gets the settle share; one still unconfirmed then is cancelled, and its original
   handed back. Every delivery is settled before the subscriber closes, so the process can exit 0
   without losing or duplicating a message's effect.
3. Close: the subscriber flushes its settles to the broker within the close share.

The budget is ``INCIDENTD_SHUTDOWN_TIMEOUT``: the worst case of all three phases fits it by
construction, so Kubernetes' ``terminationGracePeriodSeconds`` need only exceed it by a margin for the
process's own exit (the manifests: budget 30 s, grace period 40 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from application.dispatcher import Dispatcher
from application.ports import Subscriber

log = structlog.get_logger("incidentd.worker")


@dataclass(frozen=True)
class ShutdownBudget:
    """One shutdown budget, split so that the three phases together never exceed it."""

    drain: float  # running handlers finish (measured from the stop signal, stopping intake included)
    settle: float  # settles under way at the drain deadline (a copy's publish confirm)
    close: float  # the subscriber's close: its last acks flushed, its stream ended

    @classmethod
    def split(cls, total: float) -> ShutdownBudget:
        """A fifth each for settling and closing (at most 10 s and 5 s: a confirm or a flush that
        takes longer is not coming), the rest for the drain."""
        settle, close = min(total / 5, 10.0), min(total / 5, 5.0)
        return cls(drain=total - settle - close, settle=settle, close=close)


@dataclass(frozen=True)
class DrainReport:
    seconds: float
    cancelled: int


async def run_worker(
    subscriber: Subscriber,
    dispatcher: Dispatcher,
    *,
    stop: asyncio.Event,
    shutdown_timeout: float,
    on_stopping: Iterable[Callable[[], None]] = (),
) -> DrainReport:
    await subscriber.start(dispatcher.submit)
    log.info("worker.started")
    await stop.wait()
    for callback in on_stopping:
        callback()
    budget = ShutdownBudget.split(shutdown_timeout)
    log.info(
        "worker.stopping", in_flight=dispatcher.in_flight, shutdown_timeout=shutdown_timeout,
        drain_seconds=round(budget.drain, 3), settle_seconds=round(budget.settle, 3),
        close_seconds=round(budget.close, 3),
    )  # fmt: skip
    started = time.monotonic()
    await subscriber.stop()
    cancelled = await _drain(dispatcher, budget, started)
    try:
        async with asyncio.timeout(budget.close):
            await subscriber.close()
    except TimeoutError:  # what was not flushed comes back when its lease lapses: redelivered, not lost
        log.error("worker.close_timed_out", close_seconds=budget.close)
    report = DrainReport(round(time.monotonic() - started, 3), cancelled)
    log.info("worker.stopped", drain_seconds=report.seconds, cancelled=report.cancelled)
    return report


async def _drain(dispatcher: Dispatcher, budget: ShutdownBudget, started: float) -> int:
    """The drain and the settles under way at its end, within their two shares."""
    drain = max(0.0, budget.drain - (time.monotonic() - started))
    try:
        async with asyncio.timeout(drain + budget.settle):
            return await dispatcher.drain(drain)
    except TimeoutError:  # each cancelled settle handed its original back (application/settle.py)
        log.error("worker.settle_timed_out", settle_seconds=budget.settle)
        return dispatcher.in_flight
