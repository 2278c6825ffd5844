from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from uuid import uuid4

from application.messages import Message
from application.settle import read_message
from infra.memory.subscriber import MemorySubscriber
from infra.sqlite.dead_letters import SqliteDeadLetters

if TYPE_CHECKING:
    from config.settings import Settings


class MemoryQueue:
    """The 'server' side: ready messages, scheduled redeliveries, and a count of what is outstanding."""

    def __init__(self) -> None:
        self.ready: asyncio.Queue[Message] = asyncio.Queue()
        self._outstanding = 0  # queued + scheduled for redelivery + delivered but not settled
        self._idle = asyncio.Event()
        self._idle.set()
        self._timers: set[asyncio.TimerHandle] = set()

    def put(self, message: Message) -> None:
        self._outstanding += 1
        self._idle.clear()
        self.ready.put_nowait(message)

    def put_later(self, message: Message, delay: float) -> None:
        self._outstanding += 1
        self._idle.clear()

        def fire() -> None:
            self._timers.discard(handle)
            self.ready.put_nowait(message)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def done(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def close(self) -> None:
        for handle in self._timers:
            handle.cancel()


class MemoryPublisher:
    def __init__(self, queue: MemoryQueue) -> None:
        self._queue = queue

    async def publish(
        self, body: bytes, attributes: Mapping[str, str], *, message_id: str | None = None
    ) -> str:
        message_id = message_id or uuid4().hex
        self._queue.put(read_message(body, dict(attributes), message_id, datetime.now(UTC)))
        return message_id


class MemoryBroker:
    def __init__(self, dead_letters: SqliteDeadLetters, prefetch: int) -> None:
        self.queue = MemoryQueue()
        self.dead_letters = dead_letters
        self.publisher = MemoryPublisher(self.queue)
        self.subscriber = MemorySubscriber(self.queue, dead_letters, prefetch)

    async def setup(self) -> None:
        """Nothing to declare: the queue exists with the process."""

    async def wait_idle(self) -> None:
        """Return once nothing is queued, scheduled for redelivery, or in flight."""
        await self.queue.wait_idle()

    async def close(self) -> None:
        self.queue.close()
        await self.dead_letters.close()


@asynccontextmanager
async def open_broker(settings: Settings) -> AsyncIterator[MemoryBroker]:
    """The embedded broker, its dead letters kept in ``sqlite_path`` (``dlq list`` reads them after the
    run); closed on exit."""
    broker = MemoryBroker(
        await SqliteDeadLetters.open(settings.sqlite_path), prefetch=settings.concurrency * 2
    )
    try:
        yield broker
    finally:
        await broker.close()
