"""The exchange and queues incidentd uses on RabbitMQ, declared idempotently.

::

    publishers --(routing key = message type)--> exchange <E> (topic, durable)
                                                   | binding "#"
                                                   v
        +------------------------------------> queue <Q> (quorum by default) --> worker
        |                                          ^
        | TTL expires: dead-lettered back          | RETRY with delay <= 0 (shutdown hand-back):
        |                                          | nack with requeue (not an attempt)
    <Q>.retry.<ms>ms (one per delay in retry_backoff; message TTL = the delay)
        ^
        | RETRY with delay d: the smallest retry queue >= d, else the largest
      worker --DEAD_LETTER--> <Q>.dlq (no consumer; `dlq list|replay|purge`)

Retries and dead letters travel through the default exchange straight to their queue, so a RETRY never
reaches other queues bound to the main exchange. Re-declaring with the same arguments is a no-op; a
change of ``rabbitmq_queue_type`` for an existing queue is refused by RabbitMQ (PRECONDITION_FAILED), and
a changed ``retry_backoff`` adds new retry queues (old, empty ones can be deleted by hand).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from application.settle import MAX_RETRY_DELAY

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

    from config.settings import Settings

log = structlog.get_logger("incidentd.rabbitmq")

# AMQP's prefetch-count is a 16-bit field.
MAX_PREFETCH = 65_535


@dataclass(frozen=True)
class Topology:
    exchange: str
    queue: str
    queue_type: str = "quorum"
    retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)
    delivery_limit: int = 20

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        delays = tuple(sorted({min(d, MAX_RETRY_DELAY) for d in settings.retry_backoff if d > 0}))
        return cls(
            settings.rabbitmq_exchange, settings.rabbitmq_queue, settings.rabbitmq_queue_type, delays,
            settings.rabbitmq_delivery_limit,
        )  # fmt: skip

    @property
    def dlq(self) -> str:
        return f"{self.queue}.dlq"

    def retry_queue(self, delay: float) -> str:
        return f"{self.queue}.retry.{round(delay * 1000)}ms"

    @property
    def retry_queues(self) -> list[str]:
        return [self.retry_queue(d) for d in self.retry_delays]

    def retry_target(self, delay: float) -> str:
        """The queue a RETRY with this delay is published to: a redelivery no sooner than ``delay``
        where the schedule allows, never later than the longest configured delay."""
        if delay <= 0 or not self.retry_delays:
            return self.queue
        return next(
            (self.retry_queue(d) for d in self.retry_delays if d >= delay),
            self.retry_queue(self.retry_delays[-1]),
        )

    def main_arguments(self) -> dict[str, Any]:
        """Quorum: an explicit delivery limit, past which RabbitMQ dead-letters (at least once) to the
        DLQ. RabbitMQ 4.x defaults to a limit of 20 and *drops* messages past it without a dead-letter
        exchange; 3.x has no limit, so one message that breaks the consumer's connection (a frame the
        client cannot decode) would come back first for ever. Classic queues count no deliveries."""
        if self.queue_type != "quorum":
            return {"x-queue-type": self.queue_type}
        return {
            "x-queue-type": self.queue_type,
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dlq,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # at-least-once dead-lettering requires it
        }

    def policy_definition(self) -> dict[str, Any]:
        """The same backstop as a policy, for a queue declared before incidentd set it (its arguments
        cannot change: docs/rabbitmq.md)."""
        return {
            "delivery-limit": self.delivery_limit,
            "dead-letter-exchange": "",
            "dead-letter-routing-key": self.dlq,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        }

    def retry_arguments(self, delay: float) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-message-ttl": round(delay * 1000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.queue,
        }
        if self.queue_type == "quorum":
            # Quorum queues dead-letter at-most-once unless told otherwise; a retry must not vanish.
            arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        return arguments


def prefetch_for(concurrency: int) -> int:
    """Two deliveries per handler slot: the next one is already here when a slot frees up."""
    return min(2 * concurrency, MAX_PREFETCH)


async def declare(channel: AbstractChannel, topology: Topology) -> tuple[AbstractExchange, AbstractQueue]:
    """Declare everything (idempotent); return the main exchange and queue."""
    import aio_pika

    exchange = await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await declare_main_queue(channel, topology)
    await queue.bind(exchange, routing_key="#")
    for delay in topology.retry_delays:
        await channel.declare_queue(
            topology.retry_queue(delay), durable=True, arguments=topology.retry_arguments(delay)
        )
    await channel.declare_queue(topology.dlq, durable=True, arguments={"x-queue-type": topology.queue_type})
    return exchange, queue


async def declare_main_queue(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """Declare the main queue; one declared earlier with other arguments (before incidentd set a delivery
    limit) is used as it is, with a warning naming the policy that gives it the backstop."""
    from aio_pika.exceptions import ChannelPreconditionFailed

    try:
        return await channel.declare_queue(topology.queue, durable=True, arguments=topology.main_arguments())
    except ChannelPreconditionFailed as exc:
        log.warning(
            "rabbitmq.queue_arguments_differ", queue=topology.queue, error=str(exc),
            note="the queue was declared with other arguments; set the backstop as a policy "
            "(docs/rabbitmq.md, 'Delivery limit')", policy=json.dumps(topology.policy_definition()),
        )  # fmt: skip
    await channel.reopen()
    return await channel.declare_queue(topology.queue, passive=True)
