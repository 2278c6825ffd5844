"""AMQP message <-> :class:`Message`, and the AMQP copies a RETRY, a DEAD_LETTER and a replay publish.

Headers become string attributes (``Message.attributes`` is ``str -> str``); headers RabbitMQ itself sets
(``x-death``, ``x-delivery-count``, ...) are left out, and left off every copy we publish, so a message
that went round the retry path does not grow. A copy's headers are those string attributes (built by
``application.settle.copy_attributes``): whatever a publisher put in a header (bytes that are not UTF-8,
tables, 40-digit numbers), the copy carries only values RabbitMQ accepts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from application.messages import REASON_ATTR, REPLAYED_AT_ATTR, TYPE_ATTR, Message
from application.ports import DeadLetter
from application.settle import dead_letter_from, read_message

if TYPE_CHECKING:
    import aio_pika
    from aio_pika.abc import AbstractIncomingMessage

# Where a message was first published, kept across the retry path (which re-routes it by queue name).
ORIGINAL_EXCHANGE_ATTR = "x-incidentd-original-exchange"
ORIGINAL_ROUTING_KEY_ATTR = "x-incidentd-original-routing-key"
# On a replayed message: why it had been dead-lettered.
REPLAYED_REASON_ATTR = "x-incidentd-replayed-reason"

BROKER_HEADERS = frozenset(
    {
        "x-delivery-count",  # quorum queues: a backstop (x-delivery-limit), not incidentd's attempt
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


def attributes_of(incoming: AbstractIncomingMessage) -> dict[str, str]:
    """The headers as string attributes, broker headers left out, the AMQP ``type`` as ``type``."""
    attributes = {str(k): text(v) for k, v in incoming.headers.items() if k not in BROKER_HEADERS}
    if TYPE_ATTR not in attributes and incoming.type:
        attributes[TYPE_ATTR] = text(incoming.type)
    return attributes


def to_message(incoming: AbstractIncomingMessage) -> Message:
    return read_message(
        incoming.body,
        attributes_of(incoming),
        text(incoming.message_id or ""),
        incoming.timestamp,
        redelivered=bool(incoming.redelivered),
    )


def text(value: Any) -> str:
    """A header value as an attribute string (AMQP headers may be numbers, bytes, lists, tables)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def provenance(incoming: AbstractIncomingMessage, attributes: Mapping[str, str]) -> dict[str, str]:
    """The original exchange / routing key: set once, kept by every later copy."""
    return {
        ORIGINAL_EXCHANGE_ATTR: attributes.get(ORIGINAL_EXCHANGE_ATTR) or text(incoming.exchange or ""),
        ORIGINAL_ROUTING_KEY_ATTR: attributes.get(ORIGINAL_ROUTING_KEY_ATTR)
        or text(incoming.routing_key or ""),
    }


def replay_copy(incoming: AbstractIncomingMessage) -> aio_pika.Message:
    """A dead letter as a fresh message: attempt 1 again, with where it has been."""
    letter = dead_letter_of(incoming)
    headers = dict(letter.attributes) | {
        REPLAYED_AT_ATTR: datetime.now(UTC).isoformat(),
        REPLAYED_REASON_ATTR: letter.reason,
    }
    return copy_of(incoming, headers)


def copy_of(incoming: AbstractIncomingMessage, headers: Mapping[str, str]) -> aio_pika.Message:
    """``incoming`` with new headers; the message id is kept, so a copy has the original's identity."""
    import aio_pika

    return aio_pika.Message(
        incoming.body,
        headers=dict(headers),
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
    """What ``dlq list`` shows. A message RabbitMQ dead-lettered itself (past the main queue's delivery
    limit) has no reason of ours; its reason says so."""
    attributes = attributes_of(incoming)
    native = text(incoming.headers.get("x-first-death-reason") or "")
    if native and REASON_ATTR not in attributes:
        attributes[REASON_ATTR] = (
            f"dead-lettered by RabbitMQ ({native}) from queue "
            f"{text(incoming.headers.get('x-first-death-queue') or '?')}: it was delivered more often than "
            "the queue's x-delivery-limit without being settled (did it break the consumer's connection?)"
        )
    return dead_letter_from(
        text(incoming.message_id or ""),
        incoming.body,
        attributes,
        extra={
            "exchange": attributes.get(ORIGINAL_EXCHANGE_ATTR, ""),
            "routing_key": attributes.get(ORIGINAL_ROUTING_KEY_ATTR, ""),
        },
    )


def tolerate_out_of_range_timestamps() -> None:
    """Make pamqp read an AMQP ``timestamp`` it cannot represent instead of failing the whole frame.

    pamqp 4 reads the 64-bit value as seconds (milliseconds above 2**32) and raises on a year past 9999:
    one message published with a timestamp in microseconds or nanoseconds then drops the consumer's
    connection at every delivery, and the valid messages behind it wait for ever (reported upstream:
    docs/rabbitmq.md). Here such a value is read by its magnitude (µs, ns), or as no timestamp at all.
    Installed once, before the first connection; idempotent.
    """
    import struct

    from pamqp import decode

    original = decode.METHODS["timestamp"]
    if getattr(original, "incidentd_tolerant", False):
        return

    def timestamp(value: bytes) -> tuple[int, datetime | None]:
        try:
            return original(value)  # type: ignore[return-value]  # a datetime for this type
        except (ValueError, OverflowError, OSError):
            (raw,) = struct.unpack(">Q", value[0:8])
            for divisor in (1e6, 1e9):
                with contextlib.suppress(ValueError, OverflowError, OSError):
                    return 8, datetime.fromtimestamp(raw / divisor, tz=UTC)
            return 8, None

    timestamp.incidentd_tolerant = True  # type: ignore[attr-defined]
    timestamp.original = original  # type: ignore[attr-defined]
    decode.METHODS["timestamp"] = timestamp
    decode.TABLE_MAPPING[b"T"] = timestamp


def tolerate_short_strings_that_are_not_utf8() -> None:
    """Make pamqp read an AMQP short string that is not UTF-8 (with U+FFFD for the bad bytes) instead of
    failing the whole frame.

    The routing key, exchange, message id, type and the other short-string fields are bytes on the wire;
    another client may publish any. pamqp 4 decodes them strictly: one such message then drops the
    consumer's connection at every delivery (``InvalidFrameError`` in ``Basic.Deliver``), the acks of the
    whole prefetch window are lost with it, and the valid messages behind it are redelivered again and
    again until RabbitMQ's delivery limit dead-letters the poison. Read leniently, it reaches incidentd,
    which dead-letters it or handles it like any other message. Installed once, before the first
    connection; idempotent.
    """
    import struct

    from pamqp import common, decode

    original = decode.METHODS["shortstr"]
    if getattr(original, "incidentd_tolerant", False):
        return

    def short_str(value: bytes) -> tuple[int, str]:
        try:
            length = common.Struct.byte.unpack(value[0:1])[0]
        except (struct.error, TypeError) as err:
            raise ValueError("Could not unpack short string value") from err
        return length + 1, bytes(value[1 : length + 1]).decode("utf-8", "replace")

    short_str.incidentd_tolerant = True  # type: ignore[attr-defined]
    short_str.original = original  # type: ignore[attr-defined]
    decode.METHODS["shortstr"] = short_str
    decode.short_str = short_str
