"""Hands the embedded queue's messages to the dispatcher; ``application.settle`` decides, this module
provides ack, requeue and publish_copy."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from application.messages import Delivery, Disposition, Message, Outcome
from application.settle import dead_letter_from, read_message, retry_delay

if TYPE_CHECKING:
    from infra.memory.broker import MemoryQueue
    from infra.memory.dead_letters import MemoryDeadLetters

log = structlog.get_logger("incidentd.memory")


class MemoryDelivery:
    """``ack`` and ``requeue`` give the prefetch credit back; a RETRY's copy is queued for later and a
    DEAD_LETTER's copy stored before the original is acked (``application.settle``)."""

    __slots__ = ("_subscriber", "message")

    def __init__(self, message: Message, subscriber: MemorySubscriber) -> None:
        self.message = message
        self._subscriber = subscriber

    async def ack(self) -> None:
        self._subscriber.finished()
        self._subscriber.queue.done()

    async def requeue(self) -> None:
        self._subscriber.finished()
        # Still outstanding, unchanged but for the redelivered flag a broker sets on a hand-back.
        self._subscriber.queue.ready.put_nowait(dataclasses.replace(self.message, redelivered=True))

    async def publish_copy(self, attributes: Mapping[str, str], outcome: Outcome) -> None:
        message = self.message
        if outcome.disposition is Disposition.RETRY:
            copy = read_message(message.body, dict(attributes), message.message_id, message.publish_time)
            self._subscriber.queue.put_later(copy, retry_delay(outcome.delay))
        else:
            letter = dead_letter_from(message.message_id, message.body, attributes)
            await self._subscriber.dead_letters.add(letter)


class MemorySubscriber:
    """Hands queued messages over, at most ``prefetch`` unsettled at a time (like a broker's prefetch)."""

    def __init__(self, queue: MemoryQueue, dead_letters: MemoryDeadLetters, prefetch: int) -> None:
        self.queue = queue
        self.dead_letters = dead_letters
        self._credit = asyncio.Semaphore(prefetch)
        self._pump: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._pump is not None and not self._pump.done()

    async def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self._pump = asyncio.create_task(self._run(on_delivery), name="memory-subscriber")

    async def _run(self, on_delivery: Callable[[Delivery], None]) -> None:
        while True:
            await self._credit.acquire()
            message = await self.queue.ready.get()
            on_delivery(MemoryDelivery(message, self))

    def finished(self) -> None:
        self._credit.release()

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        left = self.queue.ready.qsize()
        if left:
            log.warning("memory.stopped_with_queued_messages", queued=left)

    async def close(self) -> None:
        """Nothing is buffered: every settle took effect when it returned."""
