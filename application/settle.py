"""The one way a delivery is settled, whatever the broker, and the attributes of the copy that replaces it.

A broker provides three operations on a delivery (:class:`messages.Delivery`): ``ack``, ``requeue`` and
``publish_copy``. :func:`settle` maps the dispatcher's outcome onto them, the same for every broker:

* ACK -> ``ack()``;
* RETRY with no delay -> ``requeue()``: a hand-back (a delivery not started at shutdown, or cancelled by
  the drain deadline). The message comes back as it was: a hand-back is not an attempt;
* RETRY with a delay, DEAD_LETTER -> ``publish_copy(attributes, outcome)``, then ``ack()``; if the copy is
  not confirmed, ``requeue()`` instead (redelivered, never lost) and the error is raised.

Every number incidentd reads back from a message (attempt, not-before, first-seen) is read here, hostile
until validated: :func:`read_message` builds the broker-neutral :class:`Message` and names what could not
be read in ``Message.defect`` (the dispatcher dead-letters such a message with that reason at once), and
:func:`copy_attributes` is the one place the copy's attributes are written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from application.messages import (
    ATTEMPT_ATTR,
    DEAD_LETTERED_AT_ATTR,
    ERROR_ATTR,
    FIRST_SEEN_ATTR,
    NOT_BEFORE_ATTR,
    REASON_ATTR,
    REPLAYED_AT_ATTR,
    Delivery,
    Disposition,
    Message,
    Outcome,
)
from application.ports import DeadLetter, IncidentStore

log = structlog.get_logger("incidentd.settle")

# The longest redelivery delay on every broker (a handler's ``retry_after`` of an hour waits this long):
# it is Pub/Sub's longest ack deadline, so a Pub/Sub copy is parked at most once, and the longest
# default RabbitMQ retry queue.
MAX_RETRY_DELAY = 600.0
# Attempts read from a message are clamped to this: far above any max_attempts, small enough for a log
# line and a metric label (a 40-digit header once made the outcome's JSON log line fail).
MAX_ATTEMPT = 1_000_000
MAX_VALUE_BYTES = 1024  # Pub/Sub's limit for an attribute value; reasons and errors are cut to fit
# Attributes that describe one outcome; a copy never inherits them from the delivery it replaces.
OUTCOME_ATTRS = frozenset({REASON_ATTR, ERROR_ATTR, NOT_BEFORE_ATTR, DEAD_LETTERED_AT_ATTR})
# The outcome of a delivery that is a second live copy of a message already settled: acked, not run.
DUPLICATE = Outcome(Disposition.ACK, reason="a second copy of a message already settled; not run again")


async def settle(delivery: Delivery, outcome: Outcome) -> None:
    """Settle ``delivery`` with ``outcome``: exactly one of ack, requeue, or copy-then-ack."""
    if outcome.disposition is Disposition.ACK:
        await delivery.ack()
        return
    if outcome.disposition is Disposition.RETRY and outcome.delay <= 0:
        await delivery.requeue()
        return
    try:
        await delivery.publish_copy(copy_attributes(delivery.message, outcome), outcome)
    except BaseException:
        await delivery.requeue()  # not confirmed: hand the original back, never drop it
        raise
    await delivery.ack()


class SettledRecord:
    """The messages that reached a final outcome (ACK or DEAD_LETTER), kept in the store's idempotency
    record under ``<idempotency key>:settled``, so that a second live copy of one is acked unrun.

    A message can have two live copies: a copy confirmed after its confirm timeout (the original was
    handed back meanwhile), a copy confirmed while the original's ack was lost with its channel, a
    Pub/Sub publish that a timeout could not cancel. Both copies carry the original's message id. The
    store's record already makes the second one's store change a no-op, but the side effects (Slack,
    issue comments) are derived from the committed timeline and would be sent again.

    Only a retry copy (attempt > 1) or a broker redelivery can be such a second copy: only those are
    looked up and recorded, so a first delivery costs nothing here. The record is written after the
    broker took the outcome (a dead letter whose copy was not confirmed comes back and must run). Two
    copies running at the same moment are not caught (at least once, as before). A replayed dead letter
    is a new message: its replay time is part of the key.
    """

    def __init__(self, store: IncidentStore) -> None:
        self._store = store

    async def seen(self, message: Message) -> bool:
        """Whether ``message`` is a copy of a message settled already; a store failure answers no (the
        handlers run, as they would without this record)."""
        if not _may_be_a_copy(message):
            return False
        try:
            async with self._store.transaction(_settled_key(message)) as tx:
                seen = tx.already_processed
                raise _LookUpOnly  # nothing of this transaction is kept: a look-up records nothing
        except _LookUpOnly:
            return seen
        except Exception as exc:
            log.warning("settle.record_unreadable", error=repr(exc))
            return False

    async def record(self, message: Message, outcome: Outcome) -> None:
        """Remember that ``message`` reached a final outcome; never raises (its copies then run again)."""
        if outcome.disposition is Disposition.RETRY or outcome is DUPLICATE or not _may_be_a_copy(message):
            return
        try:
            async with self._store.transaction(_settled_key(message)):
                pass
        except Exception as exc:
            log.warning("settle.record_failed", error=repr(exc))


class _LookUpOnly(Exception):
    """Rolls back the transaction :meth:`SettledRecord.seen` looks the record up in."""


def _may_be_a_copy(message: Message) -> bool:
    return message.attempt > 1 or message.redelivered


def _settled_key(message: Message) -> str:
    replayed = message.attributes.get(REPLAYED_AT_ATTR)
    return f"{message.idempotency_key}:settled" + (f":replayed:{replayed}" if replayed else "")


def retry_delay(delay: float) -> float:
    """A redelivery delay as every broker applies it: at most :data:`MAX_RETRY_DELAY` (also for ``inf``
    and NaN), never negative."""
    if not math.isfinite(delay):
        return 0.0 if math.isnan(delay) or delay < 0 else MAX_RETRY_DELAY
    return min(max(delay, 0.0), MAX_RETRY_DELAY)


def copy_attributes(message: Message, outcome: Outcome, now: datetime | None = None) -> dict[str, str]:
    """The attributes of the copy that replaces ``message`` for a RETRY (attempt + 1, not-before) or a
    DEAD_LETTER (reason, error, attempts, dead-lettered-at). Both keep the first-seen time."""
    now = now or datetime.now(UTC)
    attributes = {k: v for k, v in message.attributes.items() if k not in OUTCOME_ATTRS}
    first_seen = read_time(message.attributes.get(FIRST_SEEN_ATTR)) or message.publish_time or now
    attributes[FIRST_SEEN_ATTR] = first_seen.isoformat()
    if outcome.disposition is Disposition.RETRY:
        attributes[ATTEMPT_ATTR] = str(min(message.attempt + 1, MAX_ATTEMPT))
        attributes[NOT_BEFORE_ATTR] = f"{now.timestamp() + retry_delay(outcome.delay):.3f}"
    else:
        attributes |= {
            REASON_ATTR: fit(outcome.reason),
            ERROR_ATTR: fit(outcome.error),
            ATTEMPT_ATTR: str(message.attempt),
            DEAD_LETTERED_AT_ATTR: now.isoformat(),
        }
    return attributes


def read_message(
    body: bytes,
    attributes: Mapping[str, str],
    message_id: str = "",
    publish_time: datetime | None = None,
    redelivered: bool = False,
) -> Message:
    """The broker-neutral view of a delivery. ``attempt`` comes from incidentd's own attribute only:
    brokers' delivery counters also count hand-backs and parks, which are not attempts (they stay a
    backstop: RabbitMQ's ``x-delivery-limit``, Pub/Sub's dead_letter_policy)."""
    defects = []
    try:
        attempt = read_attempt(attributes.get(ATTEMPT_ATTR))
    except ValueError as exc:
        attempt = 1
        defects.append(f"{ATTEMPT_ATTR}: {exc}")
    try:
        read_not_before(attributes.get(NOT_BEFORE_ATTR))
    except ValueError as exc:
        defects.append(f"{NOT_BEFORE_ATTR}: {exc}")
    defect = "unreadable attribute " + "; ".join(defects) if defects else ""
    return Message(body, attributes, message_id, publish_time, attempt, defect, redelivered)


def read_attempt(value: Any) -> int:
    """An attempt attribute: a whole decimal number, clamped to 1..:data:`MAX_ATTEMPT`; absent -> 1."""
    if value is None or value == "":
        return 1
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a whole number: {_show(value)}")
    if isinstance(value, int):
        return min(max(value, 1), MAX_ATTEMPT)
    text = value.strip()
    digits = text.removeprefix("-").removeprefix("+")
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"not a whole number: {_show(value)}")
    if text.startswith("-"):
        return 1
    return MAX_ATTEMPT if len(digits) > 7 else min(max(int(digits), 1), MAX_ATTEMPT)


def read_not_before(value: str | None) -> float:
    """Seconds since the epoch a RETRY's copy is due; 0 when absent. At most :data:`MAX_RETRY_DELAY` from
    now, so a hostile value can park a message no longer than a real retry would."""
    if not value:
        return 0.0
    try:
        due = float(value)
    except ValueError:
        raise ValueError(f"not a number: {_show(value)}") from None
    if not math.isfinite(due):
        raise ValueError(f"not a finite number: {_show(value)}")
    return min(due, datetime.now(UTC).timestamp() + MAX_RETRY_DELAY)


def due_in(attributes: Mapping[str, str]) -> float:
    """Seconds until a message is due (<= 0: due now, not a retry copy, or unreadable - the dispatcher
    dead-letters the latter)."""
    try:
        due = read_not_before(attributes.get(NOT_BEFORE_ATTR))
    except ValueError:
        return 0.0
    return due - datetime.now(UTC).timestamp() if due else 0.0


def read_time(value: Any) -> datetime | None:
    """An ISO-8601 time attribute (one without an offset is UTC); ``None`` if absent or unreadable."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def dead_letter_from(
    message_id: str,
    body: bytes,
    attributes: Mapping[str, str],
    *,
    strip: frozenset[str] = frozenset(),
    extra: Mapping[str, str] | None = None,
) -> DeadLetter:
    """A dead-letter copy's attributes read back (what ``dlq list`` shows); unreadable numbers fall back
    to defaults, they never fail a listing."""
    try:
        attempts = read_attempt(attributes.get(ATTEMPT_ATTR))
    except ValueError:
        attempts = 1
    own = {ATTEMPT_ATTR} | OUTCOME_ATTRS
    return DeadLetter(
        message_id=message_id,
        body=body,
        attributes={k: v for k, v in attributes.items() if k not in own and k not in strip},
        reason=attributes.get(REASON_ATTR, ""),
        error=attributes.get(ERROR_ATTR, ""),
        attempts=attempts,
        first_seen=read_time(attributes.get(FIRST_SEEN_ATTR)),
        dead_lettered_at=read_time(attributes.get(DEAD_LETTERED_AT_ATTR)),
        extra=dict(extra or {}),
    )


def fit(value: str) -> str:
    """``value`` cut to :data:`MAX_VALUE_BYTES`, on a character boundary."""
    encoded = value.encode()
    if len(encoded) <= MAX_VALUE_BYTES:
        return value
    return encoded[: MAX_VALUE_BYTES - 3].decode("utf-8", "ignore") + "..."


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
