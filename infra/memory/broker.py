"""The embedded broker's queue and the broker object the container provides (publisher, subscriber and
dead letters are modules of their own, as for RabbitMQ and Pub/Sub)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from application.messages import Message
from common.closing import closing
from infra.memory.dead_letters import MemoryDeadLetters
from infra.memory.publisher import MemoryPublisher
from infra.memory.subscriber import MemorySubscriber

if TYPE_CHECKING:
    from application.ports import EmbeddedBroker
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


class MemoryBroker:
    """An :class:`application.ports.EmbeddedBroker`: a broker whose queue a caller can wait to be idle."""

    def __init__(self, dead_letters: MemoryDeadLetters, prefetch: int) -> None:
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
        await MemoryDeadLetters.open(settings.sqlite_path), prefetch=settings.concurrency * 2
    )
    async with closing(broker):
        yield broker


if TYPE_CHECKING:  # the protocol that ``wait_idle`` is part of, checked by mypy
    _: type[EmbeddedBroker] = MemoryBroker
