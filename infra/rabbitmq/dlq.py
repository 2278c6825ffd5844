"""``<queue>.dlq``: list, replay and purge dead letters with ``basic.get``.

Reading takes messages without acking them and closes the channel at the end, which puts every message
not acked back in its place: listing removes nothing, and a replay or purge that fails half-way leaves
what it did not finish where it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog

from application.errors import BrokerOperationError
from application.messages import REPLAYED_AT_ATTR, TYPE_ATTR, Message
from application.ports import DeadLetter, ReplayReport
from infra.rabbitmq import message as amqp

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

    from infra.rabbitmq.topology import Topology

log = structlog.get_logger("incidentd.rabbitmq.dlq")


class RabbitDeadLetters:
    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology

    async def list(self, *, limit: int | None = None) -> list[DeadLetter]:
        async with self._session() as (_, queue):
            return [amqp.dead_letter_of(m) async for m in _take(queue, limit)]

    async def replay(
        self, *, validate: Callable[[Message], object], limit: int | None = None, dry_run: bool = False
    ) -> ReplayReport:
        report = ReplayReport()
        stamps: set[str] = set()  # the replayed-at headers of the copies this run published
        async with self._session() as (channel, queue):
            exchange = await channel.get_exchange(self._topology.exchange, ensure=False)
            async for incoming in _take(queue, limit):
                if amqp.text(incoming.headers.get(REPLAYED_AT_ATTR, "")) in stamps:
                    continue  # replayed by this run and dead-lettered again: held for the next run, else
                    # a worker failing it at once would keep this run going round forever
                letter = amqp.dead_letter_of(incoming)
                message_id = letter.message_id or f"(no id, tag {incoming.delivery_tag})"
                try:
                    validate(Message(letter.body, letter.attributes, letter.message_id))
                except Exception as exc:
                    report.invalid[message_id] = str(exc)
                    continue
                if not dry_run:
                    routing_key = letter.extra.get("routing_key") or letter.attributes.get(TYPE_ATTR, "")
                    copy = amqp.replay_copy(incoming)
                    stamps.add(amqp.text(copy.headers[REPLAYED_AT_ATTR]))
                    try:
                        await exchange.publish(copy, routing_key=routing_key, mandatory=True)
                    except Exception as exc:  # not confirmed / unroutable: it stays dead-lettered
                        report.invalid[message_id] = (
                            f"could not publish to {self._topology.exchange}: {exc!r}"
                        )
                        continue
                    await incoming.ack()
                    log.info("dlq.replayed", message_id=letter.message_id, routing_key=routing_key)
                report.replayed.append(message_id)
        return report

    async def purge(self, *, limit: int | None = None, dry_run: bool = False) -> int:
        async with self._session() as (_, queue):
            count = 0
            async for incoming in _take(queue, limit):
                if not dry_run:
                    await incoming.ack()
                count += 1
            return count

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
        from aio_pika.exceptions import ChannelClosed

        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            try:
                queue = await channel.declare_queue(self._topology.dlq, passive=True)
            except ChannelClosed as exc:
                raise BrokerOperationError(
                    f"no queue {self._topology.dlq!r} on RabbitMQ; run 'app.py setup' first"
                ) from exc
            yield channel, queue
        finally:
            if not channel.is_closed:
                await channel.close()  # everything taken but not acked goes back, in order


async def _take(queue: AbstractQueue, limit: int | None) -> AsyncIterator[AbstractIncomingMessage]:
    """Oldest first, each held (unacked) until the session's channel closes."""
    count = 0
    while limit is None or count < limit:
        incoming = await queue.get(no_ack=False, fail=False, timeout=10)
        if incoming is None:
            return
        count += 1
        yield incoming
