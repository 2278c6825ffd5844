"""One robust connection to RabbitMQ and the subscriber, publisher and dead-letter queue over it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog

from infra.rabbitmq.dlq import RabbitDeadLetters
from infra.rabbitmq.message import tolerate_out_of_range_timestamps, tolerate_short_strings_that_are_not_utf8
from infra.rabbitmq.publisher import RabbitPublisher
from infra.rabbitmq.subscriber import RabbitSubscriber
from infra.rabbitmq.topology import Topology, declare, prefetch_for

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

    from config.settings import Settings

log = structlog.get_logger("incidentd.rabbitmq")


class RabbitBroker:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        publish_channel: AbstractChannel,
        exchange: AbstractExchange,
        topology: Topology,
        prefetch: int,
        confirm_timeout: float = 10.0,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self._publish_channel = publish_channel
        self.subscriber = RabbitSubscriber(
            connection, topology, publish_channel, prefetch=prefetch, confirm_timeout=confirm_timeout
        )
        self.publisher = RabbitPublisher(exchange)
        self.dead_letters = RabbitDeadLetters(connection, topology)

    async def setup(self) -> None:
        """Declare the exchange, main, retry and dead-letter queues (idempotent)."""
        await declare(self._publish_channel, self.topology)
        log.info("rabbitmq.topology_declared", exchange=self.topology.exchange, queue=self.topology.queue,
                 retry_queues=self.topology.retry_queues, dlq=self.topology.dlq)  # fmt: skip


@contextlib.asynccontextmanager
async def open_broker(
    settings: Settings,
    *,
    prefetch: int | None = None,
    on_reconnect: Callable[[], None] | None = None,
    confirm_timeout: float = 10.0,
) -> AsyncIterator[RabbitBroker]:
    """Connect (robustly: lost connections are re-established and consumers restored) and yield the broker;
    close the connection on exit. ``on_reconnect`` is called each time a lost connection is back, its
    channels and consumer restored (the ``incidentd_broker_reconnects_total`` metric)."""
    import aio_pika

    tolerate_out_of_range_timestamps()
    tolerate_short_strings_that_are_not_utf8()
    topology = Topology.from_settings(settings)
    connection = await aio_pika.connect_robust(
        settings.rabbitmq_url, client_properties={"connection_name": "incidentd"}
    )

    def reconnected(_: object) -> None:
        log.warning("rabbitmq.reconnected")
        if on_reconnect is not None:
            on_reconnect()

    connection.reconnect_callbacks.add(reconnected)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(topology.exchange, ensure=False)
        yield RabbitBroker(
            connection, channel, exchange, topology, prefetch or prefetch_for(settings.concurrency),
            confirm_timeout=confirm_timeout,
        )  # fmt: skip
    finally:
        await connection.close()
