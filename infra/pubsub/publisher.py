"""Publishes to a topic and returns only once Pub/Sub has accepted the message (the publish future)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING
from uuid import uuid4

from application.errors import BrokerOperationError
from infra.pubsub.message import MESSAGE_ID_ATTR, text_attributes

if TYPE_CHECKING:
    from google.cloud.pubsub_v1 import PublisherClient


class PubSubPublisher:
    """The client batches publishes (10 ms or 100 messages) on its own threads; each caller awaits its
    own future. Attributes carry the type and incidentd's message id (Pub/Sub sets its own id)."""

    def __init__(self, client: PublisherClient, topic_path: str, *, timeout: float = 30.0) -> None:
        self._client = client
        self._topic_path = topic_path
        self._timeout = timeout

    async def publish(
        self, body: bytes, attributes: Mapping[str, str], *, message_id: str | None = None
    ) -> str:
        message_id = message_id or uuid4().hex
        await self.publish_to(self._topic_path, body, {**attributes, MESSAGE_ID_ATTR: message_id})
        return message_id

    async def publish_to(self, topic_path: str, body: bytes, attributes: Mapping[str, str]) -> str:
        """Publish to any topic (retry copies, dead letters, replays); return Pub/Sub's message id."""
        message_id = attributes.get(MESSAGE_ID_ATTR, "")
        try:
            future = self._client.publish(topic_path, body, **text_attributes(attributes))
            async with asyncio.timeout(self._timeout):
                return str(await asyncio.wrap_future(future))
        except TimeoutError as exc:
            raise BrokerOperationError(
                f"publish of message {message_id} to {topic_path} not confirmed within {self._timeout:g}s"
            ) from exc
        except Exception as exc:  # NotFound (no topic: run setup), PermissionDenied, transport errors
            raise BrokerOperationError(
                f"publish of message {message_id} to {topic_path} not confirmed: {exc}"
            ) from exc
