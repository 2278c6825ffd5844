"""Messages RabbitMQ carries that a client library chokes on: each ends as one dead letter, and the
valid messages behind it are handled."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from application.messages import TYPE_ATTR
from config.settings import Settings
from infra.rabbitmq import open_broker
from infra.rabbitmq.topology import Topology
from tests.contract.broker_contract import (
    Ledger,
    Record,
    eventually,
    make_dispatcher,
    publish_records,
    running,
)
from tests.rabbitmq.conftest import URL, queue_depth


class NanosecondTime(datetime):
    """A publisher that writes the AMQP ``timestamp`` property in nanoseconds (pamqp encodes whatever
    ``timestamp()`` returns; its decoder then fails on the frame: year out of range)."""

    def timestamp(self) -> float:
        return 1_764_000_000_000_000_000


class NotUtf8(str):
    """A header value that goes out as a long string of bytes that are not UTF-8 (another client's
    doing); pamqp hands such a value over as ``bytes``."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe\x00junk"


async def publish_raw(topology: Topology, message: aio_pika.Message) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.exchange)
        await exchange.publish(message, routing_key=Record.TYPE)


async def test_a_header_that_is_not_utf8_is_dead_lettered_once(settings: Settings) -> None:
    """A ``type`` header of bytes that are not UTF-8: the message is dead-lettered once with a reason,
    never looped (the dead-letter copy used to fail with ``TypeError: Unknown type bytes`` and requeue
    the original: 5,000-11,000 redeliveries in 30 s), and a valid message after it is handled."""
    ledger = Ledger()
    outcomes: list[object] = []
    async with open_broker(settings, prefetch=8) as broker:
        await broker.setup()
        body = Record(key="bytes").model_dump_json().encode()
        await publish_raw(
            broker.topology,
            aio_pika.Message(body, headers={TYPE_ATTR: NotUtf8("x"), "x-trace": bytearray(b"\xff")}),
        )
        await publish_records(broker, ["ok"])
        async with running(broker, make_dispatcher(ledger, outcomes)) as stop:
            await eventually(lambda: ledger.effects["ok"] == 1)
            await eventually(lambda: _dead_letters(broker, 1))
            await asyncio.sleep(0.5)  # room for a wrongful redelivery
            await stop()
        assert len(outcomes) == 2
        [letter] = await broker.dead_letters.list()
        assert "unknown command type" in letter.reason
        topology = broker.topology
    assert await queue_depth([topology.queue, *topology.retry_queues]) == 0


async def test_a_timestamp_in_nanoseconds_is_read_and_blocks_nothing(settings: Settings) -> None:
    """An AMQP timestamp in nanoseconds used to make pamqp's frame decoder fail: the connection dropped
    at every delivery of that message, before incidentd saw it, and the valid messages behind it were
    never handled (``/readyz`` 503 for ever). The worker reads it by its magnitude and handles it like
    any other message."""
    ledger = Ledger()
    keys = ["nanoseconds", *(f"ok{i}" for i in range(5))]
    async with open_broker(settings, prefetch=8) as broker:
        await broker.setup()
        await publish_raw(broker.topology, nanosecond_message("nanoseconds"))
        await publish_records(broker, keys[1:])
        async with running(broker, make_dispatcher(ledger)) as stop:
            await eventually(lambda: sum(ledger.effects.values()) == len(keys), timeout=30)
            await stop()
        assert ledger.effects == Counter(keys)
        topology = broker.topology
    assert await queue_depth([topology.queue, *topology.retry_queues, topology.dlq]) == 0


async def test_the_delivery_limit_dead_letters_what_no_client_can_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop, proved with the exact message and pamqp's own decoder: every consumer's connection
    drops on it, RabbitMQ counts each return as a delivery, and past the main queue's explicit
    ``x-delivery-limit`` moves it to the DLQ through the dead-letter exchange (at least once) - nothing
    is dropped, and the message behind it is next in line."""
    from pamqp import decode

    settings = settings.model_copy(update={"rabbitmq_delivery_limit": 2})
    async with open_broker(settings) as broker:
        await broker.setup()
        topology = broker.topology
        await publish_raw(topology, nanosecond_message("nanoseconds"))
        await publish_records(broker, ["behind"])
    original = decode.METHODS["timestamp"].original  # pamqp's own, as every other client has it
    monkeypatch.setitem(decode.METHODS, "timestamp", original)
    monkeypatch.setitem(decode.TABLE_MAPPING, b"T", original)
    for _ in range(10):
        if await queue_depth([topology.dlq]) == 1:
            break
        await consume_until_dropped(topology.queue)
    assert await queue_depth([topology.dlq]) == 1
    async with open_broker(settings) as broker:
        [letter] = await broker.dead_letters.list()  # incidentd's own decoder reads it
    assert "dead-lettered by RabbitMQ (delivery_limit)" in letter.reason
    # the valid message, waiting at the head now (the dead-lettered one leaves the main queue once the
    # DLQ confirmed it: at-least-once)
    await eventually(lambda: _depth_is(topology.queue, 1))


async def _depth_is(queue: str, count: int) -> bool:
    return await queue_depth([queue]) == count


async def leave_unacked(message: AbstractIncomingMessage) -> None:
    """Takes the message and never settles it: closing the channel returns it."""


def nanosecond_message(key: str) -> aio_pika.Message:
    body = Record(key=key).model_dump_json().encode()
    stamp = NanosecondTime(2025, 11, 24, tzinfo=UTC)
    return aio_pika.Message(body, timestamp=stamp, headers={TYPE_ATTR: Record.TYPE})


async def consume_until_dropped(queue_name: str) -> None:
    """Consume with a plain client, prefetch 1, until its connection drops (or 5 s pass)."""
    connection = await aio_pika.connect(URL)
    dropped = asyncio.Event()
    connection.close_callbacks.add(lambda *_: dropped.set())
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)  # only the head: a message delivered with it is counted too
        queue = await channel.declare_queue(queue_name, passive=True)
        await queue.consume(leave_unacked)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dropped.wait(), 5)
    finally:
        if not connection.is_closed:
            await connection.close()


async def _dead_letters(broker: object, count: int) -> bool:
    return len(await broker.dead_letters.list()) >= count  # type: ignore[attr-defined]


async def test_a_routing_key_and_message_id_that_are_not_utf8_block_nothing(settings: Settings) -> None:
    """A message published with a routing key and a message id whose bytes are not UTF-8 used to make
    pamqp fail on the ``Basic.Deliver`` frame: the connection dropped at every delivery, the acks of the
    whole prefetch window were lost, and the valid messages behind it were redelivered over and over
    (found by tests/rabbitmq/test_fuzz.py). It is read (U+FFFD for the bad bytes) and handled once, the
    connection stays up, and every message behind it is handled once."""
    ledger = Ledger()
    keys = ["not-utf8", *(f"ok{i}" for i in range(5))]
    async with open_broker(settings, prefetch=8) as broker:
        await broker.setup()
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(broker.topology.exchange)
            body = Record(key="not-utf8").model_dump_json().encode()
            message = aio_pika.Message(body, headers={TYPE_ATTR: Record.TYPE}, message_id=NotUtf8("x"))
            await exchange.publish(message, routing_key=NotUtf8("x"))
        await publish_records(broker, keys[1:])
        async with running(broker, make_dispatcher(ledger)) as stop:
            await eventually(lambda: sum(ledger.effects.values()) == len(keys), timeout=30)
            assert broker.subscriber.connected
            await stop()
        assert ledger.effects == Counter(keys)
        topology = broker.topology
    assert await queue_depth([topology.queue, *topology.retry_queues, topology.dlq]) == 0
