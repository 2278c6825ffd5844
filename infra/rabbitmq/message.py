"""AMQP message <-> :class:`Message`, and the copies a RETRY, a DEAD_LETTER and a replay publish.

Headers become string attributes (``Message.attributes`` is ``str -> str``); headers RabbitMQ itself sets
(``x-death``, ``x-delivery-count``, ...) are left out, and left off every copy we publish, so a message
that went round the retry path does not grow. Copies keep the other headers with their original types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from application.messages import (
    ATTEMPT_ATTR,
    ERROR_ATTR,
    FIRST_SEEN_ATTR,
    REASON_ATTR,
    REPLAYED_AT_ATTR,
    TYPE_ATTR,
    Message,
    Outcome,
)
from application.ports import DeadLetter

if TYPE_CHECKING:
    import aio_pika
    from aio_pika.abc import AbstractIncomingMessage

# Where a message was first published, kept across the retry path (which re-routes it by queue name).
ORIGINAL_EXCHANGE_ATTR = "x-incidentd-original-exchange"
ORIGINAL_ROUTING_KEY_ATTR = "x-incidentd-original-routing-key"
DEAD_LETTERED_AT_ATTR = "x-incidentd-dead-lettered-at"
# On a replayed message: why it had been dead-lettered.
REPLAYED_REASON_ATTR = "x-incidentd-replayed-reason"

DELIVERY_COUNT = "x-delivery-count"  # quorum queues: earlier deliveries of this copy (0 on the first)
BROKER_HEADERS = frozenset(
    {
        DELIVERY_COUNT,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
# Set on a dead letter only; taken off again on replay.
DEAD_LETTER_HEADERS = frozenset({REASON_ATTR, ERROR_ATTR, DEAD_LETTERED_AT_ATTR, ATTEMPT_ATTR})


def to_message(incoming: AbstractIncomingMessage) -> Message:
    """The broker-neutral view of a delivery; ``attempt`` is the larger of the quorum delivery count
    (+1) and our own attempt header."""
    headers = incoming.headers
    attributes = {k: text(v) for k, v in headers.items() if k not in BROKER_HEADERS}
    if TYPE_ATTR not in attributes and incoming.type:
        attributes[TYPE_ATTR] = incoming.type
    return Message(
        incoming.body, attributes, incoming.message_id or "", incoming.timestamp, attempt_of(headers)
    )


def attempt_of(headers: Mapping[str, Any]) -> int:
    return max(_int(headers.get(DELIVERY_COUNT), 0) + 1, _int(headers.get(ATTEMPT_ATTR), 1))


def text(value: Any) -> str:
    """A header value as an attribute string (AMQP headers may be numbers, bytes, lists, tables)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def own_headers(incoming: AbstractIncomingMessage) -> dict[str, Any]:
    return {k: v for k, v in incoming.headers.items() if k not in BROKER_HEADERS}


def provenance(incoming: AbstractIncomingMessage, message: Message) -> dict[str, Any]:
    """First-seen time and original exchange / routing key: set once, kept by every later copy."""
    headers = incoming.headers
    first_seen = headers.get(FIRST_SEEN_ATTR) or (message.publish_time or datetime.now(UTC)).isoformat()
    return {
        FIRST_SEEN_ATTR: text(first_seen),
        ORIGINAL_EXCHANGE_ATTR: text(headers.get(ORIGINAL_EXCHANGE_ATTR, incoming.exchange or "")),
        ORIGINAL_ROUTING_KEY_ATTR: text(headers.get(ORIGINAL_ROUTING_KEY_ATTR, incoming.routing_key or "")),
    }


def retry_copy(incoming: AbstractIncomingMessage, message: Message) -> aio_pika.Message:
    headers = own_headers(incoming) | provenance(incoming, message)
    headers[ATTEMPT_ATTR] = str(message.attempt + 1)
    return copy_of(incoming, headers)


def dead_letter_copy(
    incoming: AbstractIncomingMessage, message: Message, outcome: Outcome
) -> aio_pika.Message:
    headers = own_headers(incoming) | provenance(incoming, message)
    headers |= {
        REASON_ATTR: outcome.reason,
        ERROR_ATTR: outcome.error,
        ATTEMPT_ATTR: str(message.attempt),
        DEAD_LETTERED_AT_ATTR: datetime.now(UTC).isoformat(),
    }
    return copy_of(incoming, headers)


def replay_copy(incoming: AbstractIncomingMessage) -> aio_pika.Message:
    """A dead letter as a fresh message: attempt 1 again, with where it has been."""
    headers = {k: v for k, v in own_headers(incoming).items() if k not in DEAD_LETTER_HEADERS}
    headers |= {
        REPLAYED_AT_ATTR: datetime.now(UTC).isoformat(),
        REPLAYED_REASON_ATTR: text(incoming.headers.get(REASON_ATTR, "")),
    }
    return copy_of(incoming, headers)


def copy_of(incoming: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    import aio_pika

    return aio_pika.Message(
        incoming.body,
        headers=headers,
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        message_id=incoming.message_id,
        timestamp=incoming.timestamp,
        type=incoming.type,
        app_id=incoming.app_id,
        correlation_id=incoming.correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def new_message(body: bytes, attributes: Mapping[str, str], message_id: str) -> aio_pika.Message:
    import aio_pika

    return aio_pika.Message(
        body,
        headers=dict(attributes),
        content_type="application/json",
        message_id=message_id,
        timestamp=datetime.now(UTC),
        type=attributes.get(TYPE_ATTR),
        app_id="incidentd",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def dead_letter_of(incoming: AbstractIncomingMessage) -> DeadLetter:
    headers = incoming.headers
    attributes = {
        k: text(v) for k, v in headers.items() if k not in BROKER_HEADERS and k not in DEAD_LETTER_HEADERS
    }
    if TYPE_ATTR not in attributes and incoming.type:
        attributes[TYPE_ATTR] = incoming.type
    return DeadLetter(
        message_id=incoming.message_id or "",
        body=incoming.body,
        attributes=attributes,
        reason=text(headers.get(REASON_ATTR, "")),
        error=text(headers.get(ERROR_ATTR, "")),
        attempts=_int(headers.get(ATTEMPT_ATTR), 1),
        first_seen=_time(headers.get(FIRST_SEEN_ATTR)),
        dead_lettered_at=_time(headers.get(DEAD_LETTERED_AT_ATTR)),
        extra={
            "exchange": attributes.get(ORIGINAL_EXCHANGE_ATTR, ""),
            "routing_key": attributes.get(ORIGINAL_ROUTING_KEY_ATTR, ""),
        },
    )


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(text(value)) if value else None
    except ValueError:
        return None
