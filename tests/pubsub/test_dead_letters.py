"""Topology, dead-letter copies, the native backstop, and ``dlq list|replay|purge`` on the emulator."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from application.factory import CommandFactory
from application.messages import (
    ATTEMPT_ATTR,
    ERROR_ATTR,
    FIRST_SEEN_ATTR,
    REASON_ATTR,
    REPLAYED_AT_ATTR,
    TYPE_ATTR,
)
from config.settings import Settings
from infra.pubsub import open_broker
from infra.pubsub.message import MESSAGE_ID_ATTR, REPLAYED_REASON_ATTR
from infra.pubsub.topology import Topology
from tests.contract.broker_contract import Ledger, Record, eventually, make_dispatcher, running
from tests.pubsub.conftest import waiting


def _pull_raw(subscription_path: str) -> list[tuple[bytes, dict[str, str], str]]:
    """(body, attributes, ack id) of what the subscription holds now; acked (taken away)."""
    from google.cloud import pubsub_v1

    with pubsub_v1.SubscriberClient() as subscriber:
        response = subscriber.pull(
            subscription=subscription_path, max_messages=100, return_immediately=True, timeout=10
        )
        found = [(r.message.data, dict(r.message.attributes), r.ack_id) for r in response.received_messages]
        if found:
            subscriber.acknowledge(subscription=subscription_path, ack_ids=[f[2] for f in found])
        return found


async def pull_raw(subscription_path: str) -> list[tuple[bytes, dict[str, str], str]]:
    return await asyncio.to_thread(_pull_raw, subscription_path)


async def _letters(broker: object, count: int) -> bool:
    return len(await broker.dead_letters.list()) >= count  # type: ignore[attr-defined]


async def test_setup_is_idempotent_and_keeps_published_messages(settings: Settings) -> None:
    """Running setup again (as every worker start does) neither fails nor drops what was published."""
    async with open_broker(settings) as broker:
        await broker.setup()
        await broker.publisher.publish(b'{"key": "a"}', {TYPE_ATTR: Record.TYPE})
        await broker.setup()
    async with open_broker(settings) as broker:
        await broker.setup()
        assert await waiting(broker.topology.subscription_path) == 1
        assert await broker.dead_letters.list() == []


async def test_dead_letter_carries_reason_error_attempts_first_seen_and_attributes(
    settings: Settings,
) -> None:
    """A poison message lands on the dead-letter subscription with the reason, the error type, the
    attempt count, the first-seen time and its own attributes, under the id it was published with."""
    topology = Topology.from_settings(settings)
    async with open_broker(settings) as broker:
        await broker.setup()
        message_id = await broker.publisher.publish(b"{not json", {TYPE_ATTR: Record.TYPE, "tenant": "acme"})
        async with running(broker, make_dispatcher(Ledger())) as stop:
            await eventually(lambda: _letters(broker, 1))
            await stop()
        [letter] = await broker.dead_letters.list()
    assert letter.message_id == message_id
    assert "not valid JSON" in letter.reason
    assert letter.error == "DecodeError"
    assert letter.attempts == 1
    assert letter.first_seen is not None and abs((datetime.now(UTC) - letter.first_seen).total_seconds()) < 60
    assert letter.attributes["tenant"] == "acme"
    assert letter.extra["subscription"] == topology.subscription
    [(body, attributes, _)] = await pull_raw(topology.dead_letter_subscription_path)
    assert body == b"{not json"
    assert attributes[REASON_ATTR] == letter.reason
    assert attributes[ERROR_ATTR] == "DecodeError"
    assert attributes[ATTEMPT_ATTR] == "1"
    assert attributes[FIRST_SEEN_ATTR]
    assert attributes[MESSAGE_ID_ATTR] == message_id
    assert attributes[TYPE_ATTR] == Record.TYPE


async def test_replay_republishes_valid_dead_letters_and_keeps_invalid_ones(settings: Settings) -> None:
    """``dlq replay`` re-validates: a message that gave up after retries goes back to the topic at
    attempt 1 with provenance attributes and its id; a poison message stays; ``dry_run`` changes
    nothing."""
    topology = Topology.from_settings(settings)
    ledger = Ledger()
    ledger.fail_until["late"] = 99
    async with open_broker(settings) as broker:
        await broker.setup()
        late_id = await broker.publisher.publish(
            Record(key="late").model_dump_json().encode(), {TYPE_ATTR: Record.TYPE}
        )
        await broker.publisher.publish(b"{not json", {TYPE_ATTR: Record.TYPE})
        async with running(broker, make_dispatcher(ledger)) as stop:
            await eventually(lambda: _letters(broker, 2))
            await stop()
        validate = CommandFactory([Record]).decode

        dry = await broker.dead_letters.replay(validate=validate, dry_run=True)
        assert dry.replayed == [late_id] and len(dry.invalid) == 1
        assert len(await broker.dead_letters.list()) == 2

        report = await broker.dead_letters.replay(validate=validate)
        assert report.replayed == [late_id]
        [why] = report.invalid.values()
        assert "not valid JSON" in why
        [left] = await broker.dead_letters.list()
        assert left.body == b"{not json"

    [(body, attributes, _)] = await pull_raw(topology.subscription_path)
    assert Record.model_validate_json(body).key == "late"
    assert ATTEMPT_ATTR not in attributes and REASON_ATTR not in attributes
    assert attributes[MESSAGE_ID_ATTR] == late_id
    assert attributes[REPLAYED_AT_ATTR]
    assert "late is not ready" in attributes[REPLAYED_REASON_ATTR]


async def test_purge_deletes_oldest_first_within_the_limit(settings: Settings) -> None:
    """``dlq purge --limit`` deletes the oldest dead letters only; ``dry_run`` only counts."""
    async with open_broker(settings) as broker:
        await broker.setup()
        async with running(broker, make_dispatcher(Ledger())) as stop:
            for i in range(3):  # one by one, so they are dead-lettered in this order
                await broker.publisher.publish(f"poison {i}".encode(), {TYPE_ATTR: Record.TYPE})
                await eventually(lambda i=i: _letters(broker, i + 1))
            await stop()
        assert await broker.dead_letters.purge(dry_run=True) == 3
        assert await broker.dead_letters.purge(limit=2) == 2
        [left] = await broker.dead_letters.list()
        assert left.body == b"poison 2"
        assert await broker.dead_letters.purge() == 1
        assert await broker.dead_letters.list() == []


async def test_the_native_dead_letter_policy_is_a_backstop_listed_with_its_count(settings: Settings) -> None:
    """A message that is never settled by incidentd (here: nacked by another client, 5 times) is
    forwarded by the subscription's dead_letter_policy; ``dlq list`` says so, with Pub/Sub's count."""
    settings = settings.model_copy(update={"pubsub_max_delivery_attempts": 5})
    async with open_broker(settings) as broker:
        await broker.setup()
        await broker.publisher.publish(b'{"key": "stuck"}', {TYPE_ATTR: Record.TYPE})
        for _ in range(20):
            if await _letters(broker, 1):
                break
            await waiting(broker.topology.subscription_path)  # pulls and nacks: one delivery attempt
            await asyncio.sleep(0.3)
        [letter] = await broker.dead_letters.list()
    assert letter.attempts == 5
    assert "dead-lettered by Pub/Sub after 5 delivery attempts" in letter.reason
    assert letter.body == b'{"key": "stuck"}'
    assert not any(k.startswith("CloudPubSub") for k in letter.attributes)
