"""Fuzzed bodies and hostile headers through a real RabbitMQ queue and a real ``python app.py worker``:
each message is one stored effect or one dead letter with a reason, the worker never crashes, and the
valid messages after them are all handled."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path

import aio_pika
import pytest

from application.commands import CreateIncident
from application.messages import ATTEMPT_ATTR, FIRST_SEEN_ATTR, NOT_BEFORE_ATTR, TYPE_ATTR
from config.settings import Settings
from infra.rabbitmq import open_broker
from infra.rabbitmq.topology import Topology
from tests.broker_fuzz import VALID, Outgoing, outcomes, run
from tests.rabbitmq.conftest import URL, queue_depth
from tests.rabbitmq.test_hostile_messages import NotUtf8
from tests.rabbitmq.test_loss import worker

BODY = CreateIncident(title="hostile headers", dedup_key="fuzz-0").model_dump_json().encode()
# Header values another client may send: bytes (byte arrays; long strings that are not UTF-8), numbers,
# nested tables, arrays, times, 40 digits.
HOSTILE_HEADERS: list[dict[str, object]] = [
    {TYPE_ATTR: bytearray(b"incident.create")},
    {TYPE_ATTR: NotUtf8("x")},
    {TYPE_ATTR: 7},
    {TYPE_ATTR: {"nested": {"table": [1, bytearray(b"x"), None]}}},
    {TYPE_ATTR: ["incident.create"]},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: 10**18},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: "9" * 40},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: "-" + "9" * 40},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: Decimal("1.5")},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: bytearray(b"3")},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: {"a": 1}},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: True},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: -3},
    {TYPE_ATTR: CreateIncident.TYPE, ATTEMPT_ATTR: 2.5},
    {TYPE_ATTR: CreateIncident.TYPE, NOT_BEFORE_ATTR: "nan"},
    {TYPE_ATTR: CreateIncident.TYPE, NOT_BEFORE_ATTR: "1e400"},
    {TYPE_ATTR: CreateIncident.TYPE, NOT_BEFORE_ATTR: 10**18},
    {TYPE_ATTR: CreateIncident.TYPE, NOT_BEFORE_ATTR: datetime(9999, 12, 31, tzinfo=UTC)},
    {TYPE_ATTR: CreateIncident.TYPE, NOT_BEFORE_ATTR: {"t": []}},
    {TYPE_ATTR: CreateIncident.TYPE, FIRST_SEEN_ATTR: "0001-01-01T00:00:00+14:00"},
    {TYPE_ATTR: CreateIncident.TYPE, FIRST_SEEN_ATTR: "2026-01-01T10:00:00"},
    {TYPE_ATTR: CreateIncident.TYPE, FIRST_SEEN_ATTR: NotUtf8("x")},
    {TYPE_ATTR: CreateIncident.TYPE, FIRST_SEEN_ATTR: 10**18},
    {TYPE_ATTR: CreateIncident.TYPE, "x-death": "not a list", "x-delivery-count": "many"},
    {TYPE_ATTR: CreateIncident.TYPE, "x-incidentd-reason": bytearray(10), "x-incidentd-error": [[[]]]},
]


async def publish(topology: Topology, messages: Outgoing) -> None:
    """Publish with a plain client (headers exactly as given), each with its message id."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.exchange)
        for message_id, body, headers in messages:
            routing_key = headers.get(TYPE_ATTR)
            await exchange.publish(
                aio_pika.Message(body, headers=headers, message_id=message_id),  # type: ignore[arg-type]
                routing_key=routing_key if isinstance(routing_key, str) else "fuzz",
            )


@pytest.mark.slow
async def test_fuzzed_messages_through_rabbitmq_are_each_one_effect_or_one_dead_letter(
    settings: Settings, tmp_path: Path
) -> None:
    """300 fuzzed bodies (random bytes, invalid UTF-8, 10,000-deep nesting, 5 MB, NaN, 400 digits,
    naive and extreme times, wrong types) and 25 messages with hostile headers (bytes, numbers, nested
    tables, a 40-digit attempt, unreadable not-before / first-seen), then 20 valid events for the same
    dedup keys: each message is one stored effect or one dead letter with a reason (never both, never
    twice), the queues end empty, every log line is JSON, the valid ones are all stored, and the worker
    exits 0 on SIGTERM."""
    topology = Topology.from_settings(settings)
    db, log = tmp_path / "incidentd.db", tmp_path / "worker.log"
    hostile: Outgoing = [(f"hostile-{i}", BODY, headers) for i, headers in enumerate(HOSTILE_HEADERS)]
    async with open_broker(settings) as broker:
        await broker.setup()
    ids = await run(worker(settings, db, log, "info"), partial(publish, topology), hostile, db, log)

    async with open_broker(settings) as broker:
        letters = await broker.dead_letters.list()
    report = outcomes(ids, db, log, letters)
    assert set(VALID) <= report.effects
    assert await queue_depth([topology.queue, *topology.retry_queues]) == 0
    print(report.summary())
