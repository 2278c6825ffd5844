"""Fixtures for tests against the real RabbitMQ on 127.0.0.1:5672: unique names per test, deleted after."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from config.settings import Settings, load
from infra.rabbitmq.topology import Topology
from tests.services import port_open, require

URL = "amqp://guest:guest@127.0.0.1:5672/"


def rabbitmq_settings(**overrides: object) -> Settings:
    """Settings for a test of its own: exchange and queues named with a random suffix."""
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, object] = {
        "broker": "rabbitmq",
        "rabbitmq_url": URL,
        "rabbitmq_exchange": f"incidentd-test-{suffix}",
        "rabbitmq_queue": f"incidentd-test-{suffix}",
    }
    return load(**(values | overrides))


async def delete_topology(topology: Topology) -> None:
    import aio_pika

    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in [topology.queue, topology.dlq, *topology.retry_queues]:
            await channel.queue_delete(name)
        await channel.exchange_delete(topology.exchange)


async def queue_depth(names: list[str]) -> int:
    """Messages in these queues that are ready (unacked ones return when their channel closes)."""
    import aio_pika

    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        total = 0
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
        return total


def rabbitmq_available() -> None:
    require(port_open("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672", "rabbitmq-server -detached")


@pytest.fixture
def rabbitmq() -> None:
    rabbitmq_available()


@pytest.fixture
async def settings(rabbitmq: None) -> AsyncIterator[Settings]:
    """Settings naming a fresh topology; the topology is deleted after the test."""
    settings = rabbitmq_settings(retry_backoff=[0.2, 0.4])
    yield settings
    await delete_topology(Topology.from_settings(settings))
