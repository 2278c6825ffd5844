"""The broker-neutral delivery and the one outcome the core returns for it.

Every subscriber (memory, RabbitMQ, Pub/Sub) turns its broker's delivery into a :class:`Message`, and
maps the :class:`Outcome` the dispatcher returns back onto its broker. That mapping is the only place a
broker acks, nacks or dead-letters.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from common.redact import redact

# Attribute / header names incidentd itself sets. Brokers carry them as headers (RabbitMQ) or attributes
# (Pub/Sub); the names are the same everywhere so a message can move between brokers (e.g. on replay).
TYPE_ATTR = "type"
ATTEMPT_ATTR = "x-incidentd-attempt"
FIRST_SEEN_ATTR = "x-incidentd-first-seen"
REASON_ATTR = "x-incidentd-reason"
ERROR_ATTR = "x-incidentd-error"
REPLAYED_AT_ATTR = "x-incidentd-replayed-at"
DEAD_LETTERED_AT_ATTR = "x-incidentd-dead-lettered-at"
# On a RETRY's copy: not to be handled before this time (seconds since the epoch).
NOT_BEFORE_ATTR = "x-incidentd-not-before"


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of one message, whatever broker it came from.

    ``attempt`` is 1 on the first delivery. Brokers that count deliveries (RabbitMQ quorum queues'
    It comes from incidentd's own ``x-incidentd-attempt`` attribute, which the retry path increments
    (see ``application.settle.read_message``). ``defect`` names attributes that could not be read; such a
    message is dead-lettered with that reason at once. ``redelivered``: the broker delivered this very
    message before (a hand-back, a lost ack); with ``attempt`` > 1 it marks a delivery that may be the
    second live copy of a message already settled (``application.settle.SettledRecord``).
    """

    body: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)
    message_id: str = ""
    publish_time: datetime | None = None
    attempt: int = 1
    defect: str = ""
    redelivered: bool = False

    @property
    def idempotency_key(self) -> str:
        """The key under which the effect of this message is recorded exactly once.

        The broker's message id when the publisher set one (it survives redelivery and our retry
        path), else a digest of the body, so that a redelivered copy of an id-less message still
        matches its first delivery.
        """
        if self.message_id:
            return self.message_id
        return "sha256:" + hashlib.sha256(self.body).hexdigest()


class Disposition(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the subscriber must do with a delivery; exactly one per delivery.

    ``delay`` (seconds) applies to RETRY: redeliver no sooner than that. ``reason`` is a short,
    human-readable sentence; for DEAD_LETTER it travels with the message to the dead-letter destination.
    """

    disposition: Disposition
    reason: str = ""
    delay: float = 0.0
    error: str = ""

    @classmethod
    def ack(cls) -> Outcome:
        return _ACK

    # Reasons are made from error texts and stored (dead-letter headers, the event lake): secrets masked.
    @classmethod
    def retry(cls, delay: float, reason: str, error: str = "") -> Outcome:
        return cls(Disposition.RETRY, reason=redact(reason), delay=delay, error=error)

    @classmethod
    def dead_letter(cls, reason: str, error: str = "") -> Outcome:
        return cls(Disposition.DEAD_LETTER, reason=redact(reason), error=error)


_ACK = Outcome(Disposition.ACK)


class Delivery(Protocol):
    """A message handed over by a subscriber, and the three things its broker can do with it.

    ``application.settle.settle`` is the only caller, exactly once per delivery: ``ack`` (done),
    ``requeue`` (hand it back unchanged: not an attempt), or ``publish_copy`` (the replacement a RETRY
    with a delay or a DEAD_LETTER publishes, returning once the broker confirmed it) followed by ``ack``.
    """

    @property
    def message(self) -> Message: ...

    async def ack(self) -> None: ...

    async def requeue(self) -> None: ...

    async def publish_copy(self, attributes: Mapping[str, str], outcome: Outcome) -> None: ...
