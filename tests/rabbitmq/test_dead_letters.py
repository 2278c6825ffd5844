"""Topology, dead-letter copies, and ``dlq list|replay|purge`` on the real RabbitMQ."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aio_pika

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
from infra.rabbitmq import open_broker
from infra.rabbitmq.message import ORIGINAL_ROUTING_KEY_ATTR, REPLAYED_REASON_ATTR
from infra.rabbitmq.topology import Topology
from tests.contract.broker_contract import Ledger, Record, eventually, make_dispatcher, running
from tests.rabbitmq.conftest import URL, queue_depth


async def test_setup_is_idempotent_and_keeps_queued_messages(settings: Settings) -> None:
    """Running setup again (as every worker start does) neither fails nor drops what is queued, and the
    retry queues redeliver to the main queue after their delay."""
    topology = Topology.from_settings(settings)
    async with open_broker(settings) as broker:
        await broker.setup()
        await broker.publisher.publish(b'{"key": "a"}', {TYPE_ATTR: Record.TYPE})
        await broker.setup()
    async with open_broker(settings) as broker:
        await broker.setup()
    await eventually(lambda: _depth_is([topology.queue], 1))
    assert topology.retry_queues == [topology.retry_queue(0.2), topology.retry_queue(0.4)]
    assert await queue_depth([topology.dlq, *topology.retry_queues]) == 0


def test_retry_goes_to_the_smallest_retry_queue_not_shorter_than_the_delay() -> None:
    """A RETRY's copy waits in the shortest retry queue that is not shorter than the asked delay (the
    longest if none is); a delay of 0 (shutdown hand-back) goes straight back to the main queue."""
    topology = Topology("x", "q", "quorum", (1.0, 5.0, 30.0))
    assert topology.retry_target(0.5) == "q.retry.1000ms"
    assert topology.retry_target(5.0) == "q.retry.5000ms"
    assert topology.retry_target(6.0) == "q.retry.30000ms"
    assert topology.retry_target(900.0) == "q.retry.30000ms"
    assert topology.retry_target(0.0) == "q"


async def test_dead_letter_carries_reason_error_attempts_first_seen_and_original_routing(
    settings: Settings,
) -> None:
    """A poison message lands in <queue>.dlq with the reason, the error type, the attempt count, the
    first-seen time, its original routing key and its own headers, and ``dlq list`` shows them."""
    topology = Topology.from_settings(settings)
    async with open_broker(settings) as broker:
        await broker.setup()
        message_id = await broker.publisher.publish(b"{not json", {TYPE_ATTR: Record.TYPE, "tenant": "acme"})
        async with running(broker, make_dispatcher(Ledger())) as stop:
            await eventually(lambda: _depth_is([topology.dlq], 1))
            await stop()
        [letter] = await broker.dead_letters.list()
    assert letter.message_id == message_id
    assert "not valid JSON" in letter.reason
    assert letter.error == "DecodeError"
    assert letter.attempts == 1
    assert letter.first_seen is not None and abs((datetime.now(UTC) - letter.first_seen).total_seconds()) < 60
    assert letter.attributes["tenant"] == "acme"
    assert letter.extra["routing_key"] == Record.TYPE
    raw = await _get_raw(topology.dlq)
    assert raw.headers[REASON_ATTR] == letter.reason
    assert raw.headers[ERROR_ATTR] == "DecodeError"
    assert raw.headers[ATTEMPT_ATTR] == "1"
    assert raw.headers[FIRST_SEEN_ATTR]
    assert raw.headers[ORIGINAL_ROUTING_KEY_ATTR] == Record.TYPE
    assert raw.body == b"{not json"


async def test_replay_republishes_valid_dead_letters_and_keeps_invalid_ones(settings: Settings) -> None:
    """``dlq replay`` re-validates: a message that gave up after retries goes back to the main queue at
    attempt 1 with provenance headers; a poison message stays; ``--dry-run`` changes nothing."""
    topology = Topology.from_settings(settings)
    ledger = Ledger()
    ledger.fail_until["late"] = 99
    async with open_broker(settings) as broker:
        await broker.setup()
        await broker.publisher.publish(
            Record(key="late").model_dump_json().encode(), {TYPE_ATTR: Record.TYPE}
        )
        await broker.publisher.publish(b"{not json", {TYPE_ATTR: Record.TYPE})
        async with running(broker, make_dispatcher(ledger)) as stop:
            await eventually(lambda: _depth_is([topology.dlq], 2))
            await stop()
        validate = CommandFactory([Record]).decode

        dry = await broker.dead_letters.replay(validate=validate, dry_run=True)
        assert len(dry.replayed) == 1 and len(dry.invalid) == 1
        assert await queue_depth([topology.dlq]) == 2

        report = await broker.dead_letters.replay(validate=validate)
        assert len(report.replayed) == 1
        [why] = report.invalid.values()
        assert "not valid JSON" in why
        [left] = await broker.dead_letters.list()
        assert left.body == b"{not json"

    replayed = await _get_raw(topology.queue)
    assert Record.model_validate_json(replayed.body).key == "late"
    assert ATTEMPT_ATTR not in replayed.headers and REASON_ATTR not in replayed.headers
    assert replayed.headers[REPLAYED_AT_ATTR]
    assert "late is not ready" in replayed.headers[REPLAYED_REASON_ATTR]
    assert replayed.routing_key == Record.TYPE


async def test_purge_deletes_oldest_first_within_the_limit(settings: Settings) -> None:
    """``dlq purge --limit`` deletes the oldest dead letters only; ``--dry-run`` only counts."""
    topology = Topology.from_settings(settings)
    async with open_broker(settings) as broker:
        await broker.setup()
        for i in range(3):
            await broker.publisher.publish(f"poison {i}".encode(), {TYPE_ATTR: Record.TYPE})
        async with running(broker, make_dispatcher(Ledger())) as stop:
            await eventually(lambda: _depth_is([topology.dlq], 3))
            await stop()
        assert await broker.dead_letters.purge(dry_run=True) == 3
        assert await broker.dead_letters.purge(limit=2) == 2
        [left] = await broker.dead_letters.list()
        assert left.body == b"poison 2"
        assert await broker.dead_letters.purge() == 1
        assert await broker.dead_letters.list() == []


async def _depth_is(names: list[str], count: int) -> bool:
    return await queue_depth(names) == count


async def _get_raw(queue_name: str) -> aio_pika.abc.AbstractIncomingMessage:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(no_ack=True, timeout=5)
        assert message is not None
        return message


async def test_a_replay_run_replays_each_dead_letter_once_even_if_it_returns(settings: Settings) -> None:
    """A replayed message that is dead-lettered again while the replay still runs (a worker failing it
    permanently at once) is not replayed again by the same run: ``dlq replay`` ends, having replayed
    each dead letter once, and leaves the copy in the DLQ for the next run. Here the DLQ is also bound
    to the main exchange, so every replayed copy is back in it before its publish is even confirmed -
    the fastest possible such worker."""
    topology = Topology.from_settings(settings)
    async with open_broker(settings) as broker:
        await broker.setup()
        for key in ("a", "b"):
            await broker.publisher.publish(
                Record(key=key).model_dump_json().encode(), {TYPE_ATTR: Record.TYPE}
            )
        await _move_all(topology.queue, topology.dlq)
        await _bind(topology.dlq, topology.exchange)
        validate = CommandFactory([Record]).decode
        report = await asyncio.wait_for(broker.dead_letters.replay(validate=validate), 10)
    assert len(report.replayed) == 2 and report.invalid == {}
    assert await queue_depth([topology.queue]) == 2
    await eventually(lambda: _depth_is([topology.dlq], 2))  # the copies it held, back in place


async def test_two_copies_of_one_dead_letter_are_listed_and_replayed_once(settings: Settings) -> None:
    """Two dead-letter copies with the same message id (a worker SIGKILLed between the copy's confirm
    and the original's ack) are one ``dlq list`` entry with ``copies == 2``; ``dlq replay`` publishes
    the message once and removes both copies (it used to replay both: a duplicate effect)."""
    topology = Topology.from_settings(settings)
    async with open_broker(settings) as broker:
        await broker.setup()
        body = Record(key="k").model_dump_json().encode()
        for _ in range(2):
            await broker.publisher.publish(body, {TYPE_ATTR: Record.TYPE}, message_id="same-id")
        await _move_all(topology.queue, topology.dlq)
        [letter] = await broker.dead_letters.list()
        assert (letter.message_id, letter.copies) == ("same-id", 2)
        report = await broker.dead_letters.replay(validate=CommandFactory([Record]).decode)
    assert report.replayed == ["same-id"]
    assert await queue_depth([topology.queue]) == 1
    await eventually(lambda: _depth_is([topology.dlq], 0))


async def _move_all(source: str, target: str) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(source, passive=True)
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            await channel.default_exchange.publish(
                aio_pika.Message(message.body, headers=message.headers, message_id=message.message_id), target
            )
            await message.ack()


async def _bind(queue_name: str, exchange: str) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        await queue.bind(exchange, routing_key="#")
