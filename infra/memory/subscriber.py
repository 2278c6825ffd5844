from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from application.messages import ATTEMPT_ATTR, FIRST_SEEN_ATTR, Delivery, Disposition, Message, Outcome
from application.ports import DeadLetter

if TYPE_CHECKING:
    from infra.memory.broker import MemoryQueue
    from infra.sqlite.dead_letters import SqliteDeadLetters

log = structlog.get_logger("incidentd.memory")


class MemoryDelivery:
    __slots__ = ("_subscriber", "message")

    def __init__(self, message: Message, subscriber: MemorySubscriber) -> None:
        self.message = message
        self._subscriber = subscriber

    async def settle(self, outcome: Outcome) -> None:
        await self._subscriber.settle(self.message, outcome)


class MemorySubscriber:
    """Hands queued messages over, at most ``prefetch`` unsettled at a time (like a broker's prefetch)."""

    def __init__(self, queue: MemoryQueue, dead_letters: SqliteDeadLetters, prefetch: int) -> None:
        self._queue = queue
        self._dead_letters = dead_letters
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
            message = await self._queue.ready.get()
            on_delivery(MemoryDelivery(message, self))

    async def settle(self, message: Message, outcome: Outcome) -> None:
        try:
            if outcome.disposition is Disposition.RETRY:
                self._queue.put_later(redelivered(message), outcome.delay)
                return  # still outstanding until the copy is settled
            if outcome.disposition is Disposition.DEAD_LETTER:
                try:
                    await self._dead_letters.add(dead_letter(message, outcome.reason, outcome.error))
                except BaseException:
                    self._queue.ready.put_nowait(message)  # not stored: hand it back, as a nack would
                    raise
            self._queue.done()
        finally:
            self._credit.release()

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        left = self._queue.ready.qsize()
        if left:
            log.warning("memory.stopped_with_queued_messages", queued=left)

    async def close(self) -> None:
        """Nothing is buffered: every settle took effect when it returned."""


def redelivered(message: Message) -> Message:
    """The copy a RETRY puts back: attempt + 1, first-seen time kept."""
    attributes = {
        **message.attributes,
        ATTEMPT_ATTR: str(message.attempt + 1),
        FIRST_SEEN_ATTR: message.attributes.get(FIRST_SEEN_ATTR)
        or (message.publish_time or datetime.now(UTC)).isoformat(),
    }
    return Message(message.body, attributes, message.message_id, message.publish_time, message.attempt + 1)


def dead_letter(message: Message, reason: str, error: str) -> DeadLetter:
    first_seen = message.attributes.get(FIRST_SEEN_ATTR)
    return DeadLetter(
        message_id=message.message_id,
        body=message.body,
        attributes=message.attributes,
        reason=reason,
        error=error,
        attempts=message.attempt,
        first_seen=datetime.fromisoformat(first_seen) if first_seen else message.publish_time,
        dead_lettered_at=datetime.now(UTC),
    )
