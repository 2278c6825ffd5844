"""Publishes to the main exchange and returns only once RabbitMQ has confirmed the message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from uuid import uuid4

from application.errors import BrokerOperationError
from application.messages import TYPE_ATTR
from infra.rabbitmq.message import new_message

if TYPE_CHECKING:
    from aio_pika.abc import AbstractExchange


class RabbitPublisher:
    """The routing key is the message type, so a topic exchange can route by type; incidentd's own
    queue is bound with ``#`` and takes every type."""

    def __init__(self, exchange: AbstractExchange, *, timeout: float = 30.0) -> None:
        self._exchange = exchange
        self._timeout = timeout

    async def publish(
        self, body: bytes, attributes: Mapping[str, str], *, message_id: str | None = None
    ) -> str:
        from aio_pika.exceptions import AMQPError, DeliveryError

        message_id = message_id or uuid4().hex
        message = new_message(body, attributes, message_id)
        try:
            await self._exchange.publish(
                message, routing_key=attributes.get(TYPE_ATTR, ""), mandatory=True, timeout=self._timeout
            )
        except DeliveryError as exc:  # nacked, or returned as unroutable
            raise BrokerOperationError(f"RabbitMQ did not accept message {message_id}: {exc}") from exc
        except (AMQPError, TimeoutError, ConnectionError) as exc:
            raise BrokerOperationError(f"publish of message {message_id} not confirmed: {exc!r}") from exc
        return message_id
