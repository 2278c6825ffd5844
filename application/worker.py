"""The worker's life: consume until told to stop, then shut down in two phases.

1. Stop taking work: readiness turns false and the subscriber stops consuming (deliveries it buffered go
   back to the broker at once).
2. Drain: running handlers get up to ``shutdown_timeout`` seconds to finish; whatever is still running
   then is cancelled and handed back (RETRY, no delay). Every delivery is settled before the subscriber
   closes, so the process can exit 0 without losing or duplicating a message's effect.

Kubernetes' ``terminationGracePeriodSeconds`` must exceed ``shutdown_timeout`` by the time the subscriber
needs to close, or the kubelet's SIGKILL cuts the drain short.
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
    log.info("worker.stopping", in_flight=dispatcher.in_flight, shutdown_timeout=shutdown_timeout)
    started = time.monotonic()
    await subscriber.stop()
    cancelled = await dispatcher.drain(shutdown_timeout)
    await subscriber.close()
    report = DrainReport(round(time.monotonic() - started, 3), cancelled)
    log.info("worker.stopped", drain_seconds=report.seconds, cancelled=report.cancelled)
    return report
