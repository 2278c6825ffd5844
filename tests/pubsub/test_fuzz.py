"""Fuzzed bodies and hostile attributes through a real Pub/Sub emulator subscription and a real
``python app.py worker``: each message is one stored effect or one dead letter with a reason, the worker
never crashes, and the valid messages after them are all handled."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from application.commands import CreateIncident
from application.messages import ATTEMPT_ATTR, FIRST_SEEN_ATTR, NOT_BEFORE_ATTR, TYPE_ATTR
from config.settings import Settings
from infra.pubsub import open_broker
from infra.pubsub.message import MESSAGE_ID_ATTR
from tests.broker_fuzz import VALID, Outgoing, outcomes, run
from tests.pubsub.conftest import backlog
from tests.pubsub.test_loss import worker

BODY = CreateIncident(title="hostile attributes", dedup_key="fuzz-0").model_dump_json().encode()
CREATE = {TYPE_ATTR: CreateIncident.TYPE}
# Attribute values another publisher may send for incidentd's own attributes.
FULLWIDTH_12 = "\uff11\uff12"  # digits to str.isdigit, not to int() in every language
ATTEMPTS = ("NaN", "-5", "9" * 40, "-" + "9" * 40, "1.5", FULLWIDTH_12, " 3 ", "0x10", "")
NOT_BEFORES = ("nan", "inf", "-inf", "1e400", "9" * 400, "-1e300", "soon", "\x00")
FIRST_SEENS = ("garbage", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "2026-01-01T10:00:00",
               "9" * 40, "")  # fmt: skip
HOSTILE_ATTRIBUTES: list[dict[str, str]] = [
    *({ATTEMPT_ATTR: v} | CREATE for v in ATTEMPTS),
    *({NOT_BEFORE_ATTR: v} | CREATE for v in NOT_BEFORES),
    *({FIRST_SEEN_ATTR: v} | CREATE for v in FIRST_SEENS),
    {TYPE_ATTR: "incident.create\x00"}, {TYPE_ATTR: "x" * 1024}, {TYPE_ATTR: ""},
    {"CloudPubSubDeadLetterSourceDeliveryCount": "9" * 40, "x-incidentd-reason": "forged"} | CREATE,
]  # fmt: skip


async def publish(broker: object, messages: Outgoing) -> None:
    """Publish each with its message id; attribute values that are not strings go as JSON."""
    for message_id, body, attributes in messages:
        text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in attributes.items()}
        await broker.publisher.publish_to(  # type: ignore[attr-defined]
            broker.topology.topic_path,
            body,
            text | {MESSAGE_ID_ATTR: message_id},  # type: ignore[attr-defined]
        )


@pytest.mark.slow
async def test_fuzzed_messages_through_pubsub_are_each_one_effect_or_one_dead_letter(
    settings: Settings, tmp_path: Path
) -> None:
    """300 fuzzed bodies (random bytes, invalid UTF-8, 10,000-deep nesting, 5 MB, NaN, 400 digits,
    naive and extreme times, wrong types) and 27 messages with garbage attempt / not-before /
    first-seen / type attributes, then 20 valid events for the same dedup keys: each message is one
    stored effect or one dead letter with a reason (never both, never twice), nothing is left on the
    subscription, every log line is JSON, the valid ones are all stored, and the worker exits 0 on
    SIGTERM."""
    db, log = tmp_path / "incidentd.db", tmp_path / "worker.log"
    hostile: Outgoing = [(f"hostile-{i}", BODY, dict(a)) for i, a in enumerate(HOSTILE_ATTRIBUTES)]
    async with open_broker(settings) as broker:
        await broker.setup()
        ids = await run(worker(settings, db, log, "info"), partial(publish, broker), hostile, db, log)
        letters = await broker.dead_letters.list()
        assert await backlog(broker.topology) == 0
    report = outcomes(ids, db, log, letters)
    assert set(VALID) <= report.effects
    print(report.summary())
