"""Publishes into the embedded queue: the message is queued when ``publish`` returns (nothing to confirm)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from uuid import uuid4

from application.settle import read_message

if TYPE_CHECKING:
    from infra.memory.broker import MemoryQueue


class MemoryPublisher:
    def __init__(self, queue: MemoryQueue) -> None:
        self._queue = queue

    async def publish(
        self, body: bytes, attributes: Mapping[str, str], *, message_id: str | None = None
    ) -> str:
        message_id = message_id or uuid4().hex
        self._queue.put(read_message(body, dict(attributes), message_id, datetime.now(UTC)))
        return message_id
