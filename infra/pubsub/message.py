"""Pub/Sub message <-> :class:`Message`, and the attributes of the copies a RETRY, a DEAD_LETTER and a
replay publish.

Pub/Sub assigns its own message id on every publish, so incidentd carries its id in the
``x-incidentd-message-id`` attribute: a retry copy, a dead letter and a replay keep it, and with it the
idempotency key. A message published without it (a relay, ``gcloud pubsub topics publish``) is known by
its Pub/Sub id, which every copy then carries.

Attribute values are limited to 1024 bytes by Pub/Sub; reasons and errors are cut to fit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from application.messages import (
    ATTEMPT_ATTR,
    ERROR_ATTR,
    FIRST_SEEN_ATTR,
    REASON_ATTR,
    REPLAYED_AT_ATTR,
    Message,
    Outcome,
)
from application.ports import DeadLetter

if TYPE_CHECKING:
    from google.cloud.pubsub_v1.subscriber.message import Message as Received
    from google.pubsub_v1.types import ReceivedMessage

MESSAGE_ID_ATTR = "x-incidentd-message-id"
# On a RETRY's copy: not to be handled before this time (seconds since the epoch).
NOT_BEFORE_ATTR = "x-incidentd-not-before"
DEAD_LETTERED_AT_ATTR = "x-incidentd-dead-lettered-at"
SOURCE_SUBSCRIPTION_ATTR = "x-incidentd-source-subscription"
PUBSUB_ID_ATTR = "x-incidentd-pubsub-message-id"  # the dead-lettered delivery's own Pub/Sub id
REPLAYED_REASON_ATTR = "x-incidentd-replayed-reason"
# Set by Pub/Sub when the subscription's dead_letter_policy forwards a message (the native backstop).
NATIVE_DELIVERY_COUNT_ATTR = "CloudPubSubDeadLetterSourceDeliveryCount"
NATIVE_SUBSCRIPTION_ATTR = "CloudPubSubDeadLetterSourceSubscription"
NATIVE_PREFIX = "CloudPubSubDeadLetterSource"

# Set on a dead letter only; taken off again on replay.
DEAD_LETTER_ATTRS = frozenset(
    {REASON_ATTR, ERROR_ATTR, ATTEMPT_ATTR, DEAD_LETTERED_AT_ATTR, SOURCE_SUBSCRIPTION_ATTR, PUBSUB_ID_ATTR}
)
MAX_VALUE_BYTES = 1024


def to_message(received: Received) -> Message:
    """The broker-neutral view; ``attempt`` is the larger of our attempt attribute and Pub/Sub's
    ``delivery_attempt`` (present when the subscription has a dead-letter policy)."""
    attributes = dict(received.attributes)
    attempt = int(attributes.get(ATTEMPT_ATTR) or 1)
    delivery_attempt = received.delivery_attempt
    if delivery_attempt is not None and delivery_attempt > attempt:
        attempt = delivery_attempt
    return Message(
        received.data,
        attributes,
        attributes.get(MESSAGE_ID_ATTR) or received.message_id,
        received.publish_time,
        attempt,
    )


def not_before(received: Received) -> float:
    """Seconds until a RETRY's copy is due (<= 0: due now, or not a copy)."""
    value = received.attributes.get(NOT_BEFORE_ATTR)
    if not value:
        return 0.0
    try:
        return float(value) - time.time()
    except ValueError:
        return 0.0


def _provenance(message: Message) -> dict[str, str]:
    first_seen = (
        message.attributes.get(FIRST_SEEN_ATTR) or (message.publish_time or datetime.now(UTC)).isoformat()
    )
    return {MESSAGE_ID_ATTR: message.message_id, FIRST_SEEN_ATTR: first_seen}


def retry_attributes(message: Message, outcome: Outcome) -> dict[str, str]:
    attributes = dict(message.attributes) | _provenance(message)
    attributes[ATTEMPT_ATTR] = str(message.attempt + 1)
    attributes[NOT_BEFORE_ATTR] = f"{time.time() + outcome.delay:.3f}"
    return attributes


def dead_letter_attributes(
    message: Message, outcome: Outcome, pubsub_id: str, subscription: str
) -> dict[str, str]:
    attributes = {k: v for k, v in message.attributes.items() if k != NOT_BEFORE_ATTR}
    return (
        attributes
        | _provenance(message)
        | {
            REASON_ATTR: fit(outcome.reason),
            ERROR_ATTR: fit(outcome.error),
            ATTEMPT_ATTR: str(message.attempt),
            DEAD_LETTERED_AT_ATTR: datetime.now(UTC).isoformat(),
            SOURCE_SUBSCRIPTION_ATTR: subscription,
            PUBSUB_ID_ATTR: pubsub_id,
        }
    )


def replay_attributes(letter: DeadLetter) -> dict[str, str]:
    """A dead letter as a fresh message: attempt 1 again, with where it has been (and the same id)."""
    return dict(letter.attributes) | {
        MESSAGE_ID_ATTR: letter.message_id,
        REPLAYED_AT_ATTR: datetime.now(UTC).isoformat(),
        REPLAYED_REASON_ATTR: fit(letter.reason),
    }


def dead_letter_of(received: ReceivedMessage) -> DeadLetter:
    """What ``dlq list`` shows. A message the native dead_letter_policy forwarded has no reason of ours;
    its reason says so, with Pub/Sub's delivery count."""
    pubsub_message = received.message
    raw = dict(pubsub_message.attributes)
    attributes = {
        k: v
        for k, v in raw.items()
        if k not in DEAD_LETTER_ATTRS and k != NOT_BEFORE_ATTR and not k.startswith(NATIVE_PREFIX)
    }
    reason, attempts = raw.get(REASON_ATTR, ""), _int(raw.get(ATTEMPT_ATTR), 1)
    if not reason and NATIVE_DELIVERY_COUNT_ATTR in raw:
        attempts = _int(raw[NATIVE_DELIVERY_COUNT_ATTR], 1)
        reason = (
            f"dead-lettered by Pub/Sub after {attempts} delivery attempts "
            f"(dead_letter_policy of subscription {raw.get(NATIVE_SUBSCRIPTION_ATTR, '?')})"
        )
    published = pubsub_message.publish_time
    return DeadLetter(
        message_id=raw.get(MESSAGE_ID_ATTR) or pubsub_message.message_id,
        body=pubsub_message.data,
        attributes=attributes,
        reason=reason,
        error=raw.get(ERROR_ATTR, ""),
        attempts=attempts,
        first_seen=_time(raw.get(FIRST_SEEN_ATTR)),
        dead_lettered_at=_time(raw.get(DEAD_LETTERED_AT_ATTR)) or published,
        extra={
            "pubsub_message_id": pubsub_message.message_id,
            "subscription": raw.get(SOURCE_SUBSCRIPTION_ATTR) or raw.get(NATIVE_SUBSCRIPTION_ATTR, ""),
        },
    )


def fit(value: str) -> str:
    """``value`` cut to Pub/Sub's limit for an attribute value, on a character boundary."""
    encoded = value.encode()
    if len(encoded) <= MAX_VALUE_BYTES:
        return value
    return encoded[: MAX_VALUE_BYTES - 3].decode("utf-8", "ignore") + "..."


def text_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    return {str(k): str(v) for k, v in attributes.items()}


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
