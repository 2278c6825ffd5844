"""Pub/Sub message <-> :class:`Message`, and the attributes of the copies a RETRY, a DEAD_LETTER and a
replay publish.

Pub/Sub assigns its own message id on every publish, so incidentd carries its id in the
``x-incidentd-message-id`` attribute: a retry copy, a dead letter and a replay keep it, and with it the
idempotency key. A message published without it (a relay, ``gcloud pubsub topics publish``) is known by
its Pub/Sub id, which every copy then carries.

Attribute values are limited to 1024 bytes by Pub/Sub; reasons and errors are cut to fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from application.messages import REPLAYED_AT_ATTR, Disposition, Message, Outcome
from application.ports import DeadLetter
from application.settle import dead_letter_from, fit, read_attempt, read_message

if TYPE_CHECKING:
    from google.cloud.pubsub_v1.subscriber.message import Message as Received
    from google.pubsub_v1.types import ReceivedMessage

MESSAGE_ID_ATTR = "x-incidentd-message-id"
SOURCE_SUBSCRIPTION_ATTR = "x-incidentd-source-subscription"
PUBSUB_ID_ATTR = "x-incidentd-pubsub-message-id"  # the dead-lettered delivery's own Pub/Sub id
REPLAYED_REASON_ATTR = "x-incidentd-replayed-reason"
# Set by Pub/Sub when the subscription's dead_letter_policy forwards a message (the native backstop).
NATIVE_DELIVERY_COUNT_ATTR = "CloudPubSubDeadLetterSourceDeliveryCount"
NATIVE_SUBSCRIPTION_ATTR = "CloudPubSubDeadLetterSourceSubscription"
NATIVE_PREFIX = "CloudPubSubDeadLetterSource"


def to_message(received: Received) -> Message:
    """The broker-neutral view. ``attempt`` is incidentd's own attribute only: Pub/Sub's
    ``delivery_attempt`` also counts nacks at shutdown and parks, which are not attempts; it only says
    that this delivery may be a second copy of a settled message (``redelivered``, looked up in the
    dispatcher's settled record). Without a dead-letter policy the client reports None."""
    return read_message(
        received.data,
        dict(received.attributes),
        received.attributes.get(MESSAGE_ID_ATTR) or received.message_id,
        received.publish_time,
        redelivered=(received.delivery_attempt or 0) > 1,
    )


def copy_attributes(attributes: Mapping[str, str], message: Message, outcome: Outcome, pubsub_id: str,
                    subscription: str) -> dict[str, str]:  # fmt: skip
    """``application.settle``'s copy attributes plus incidentd's message id (Pub/Sub gives every
    publish a new one) and, on a dead letter, where it came from."""
    copy = dict(attributes) | {MESSAGE_ID_ATTR: message.message_id}
    if outcome.disposition is Disposition.DEAD_LETTER:
        copy |= {SOURCE_SUBSCRIPTION_ATTR: subscription, PUBSUB_ID_ATTR: pubsub_id}
    return copy


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
    attributes = {k: v for k, v in raw.items() if not k.startswith(NATIVE_PREFIX)}
    letter = dead_letter_from(
        raw.get(MESSAGE_ID_ATTR) or pubsub_message.message_id,
        pubsub_message.data,
        attributes,
        strip=frozenset({SOURCE_SUBSCRIPTION_ATTR, PUBSUB_ID_ATTR}),
        extra={
            "pubsub_message_id": pubsub_message.message_id,
            "subscription": raw.get(SOURCE_SUBSCRIPTION_ATTR) or raw.get(NATIVE_SUBSCRIPTION_ATTR, ""),
        },
    )
    changes: dict[str, object] = {}
    if not letter.reason and NATIVE_DELIVERY_COUNT_ATTR in raw:
        try:
            attempts = read_attempt(raw[NATIVE_DELIVERY_COUNT_ATTR])
        except ValueError:
            attempts = 1
        changes["attempts"] = attempts
        changes["reason"] = (
            f"dead-lettered by Pub/Sub after {attempts} delivery attempts "
            f"(dead_letter_policy of subscription {raw.get(NATIVE_SUBSCRIPTION_ATTR, '?')})"
        )
    if letter.dead_lettered_at is None:
        changes["dead_lettered_at"] = pubsub_message.publish_time
    return dataclasses.replace(letter, **changes) if changes else letter  # type: ignore[arg-type]


def text_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    return {str(k): str(v) for k, v in attributes.items()}
