"""The worker's shutdown fits its one budget, whatever hangs: handlers, a copy's publish, the close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from structlog.testing import capture_logs

from application.errors import TransientError
from application.messages import Delivery, Outcome
from application.worker import ShutdownBudget, run_worker
from tests.unit.test_dispatcher import FakeDelivery, Ping, delivery, dispatcher


class HangingCopy(FakeDelivery):
    """A broker that never confirms the copy's publish."""

    async def publish_copy(self, attributes: Mapping[str, str], outcome: Outcome) -> None:
        await asyncio.Event().wait()


class HangingSubscriber:
    """Hands over its deliveries at start; its close never finishes."""

    def __init__(self, deliveries: list[FakeDelivery]) -> None:
        self._deliveries = deliveries
        self.connected = True

    async def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        for item in self._deliveries:
            on_delivery(item)

    async def stop(self) -> None:
        pass

    async def close(self) -> None:
        await asyncio.Event().wait()


def test_the_budget_is_split_into_shares_that_add_up_to_it() -> None:
    """Drain, settle and close shares always sum to the budget, none negative."""
    for total in (0.0, 1.0, 10.0, 25.0, 30.0, 120.0):
        budget = ShutdownBudget.split(total)
        assert min(budget.drain, budget.settle, budget.close) >= 0
        assert abs(budget.drain + budget.settle + budget.close - total) < 1e-9


async def test_a_shutdown_where_everything_hangs_still_ends_within_its_budget() -> None:
    """A handler that never returns, a retry copy whose publish is never confirmed and a close that
    never finishes: the worker still returns within INCIDENTD_SHUTDOWN_TIMEOUT (3 s here), logs each
    share at the start, hands the handler's delivery and the unconfirmed copy's original back, and
    settles each exactly once."""

    async def handler(cmd: Ping, ctx: object) -> None:
        if cmd.n == 1:
            raise TransientError("not yet")  # a RETRY with a delay: a copy, never confirmed
        await asyncio.Event().wait()

    running, copying = delivery(0), HangingCopy(delivery(1).message)
    subscriber = HangingSubscriber([running, copying])
    stop = asyncio.Event()
    d = dispatcher(handler, in_process_attempts=1)
    with capture_logs() as logs:
        worker = asyncio.create_task(run_worker(subscriber, d, stop=stop, shutdown_timeout=3.0))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(worker, 10)
    took = time.monotonic() - started
    assert took < 3.5, f"shutdown took {took:.1f}s, over its 3 s budget"
    [stopping] = [e for e in logs if e["event"] == "worker.stopping"]
    assert (stopping["drain_seconds"], stopping["settle_seconds"], stopping["close_seconds"]) == (
        1.8,
        0.6,
        0.6,
    )
    assert [o.delay for o in running.outcomes] == [0.0]  # cancelled at the drain deadline: handed back
    assert [o.delay for o in copying.outcomes] == [0.0]  # the copy never confirmed: the original back
    assert {e["event"] for e in logs} >= {"worker.close_timed_out"}
