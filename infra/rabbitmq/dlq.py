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

from application.dead_letters import by_original, listed
from application.errors import BrokerOperationError
from application.messages import TYPE_ATTR, Message
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
            groups = await _originals(queue)
            return [listed(group, amqp.dead_letter_of) for group in groups[:limit]]

    async def replay(
        self, *, validate: Callable[[Message], object], limit: int | None = None, dry_run: bool = False
    ) -> ReplayReport:
        """Each original once: one copy is published, then every copy of it is acked."""
        report = ReplayReport()
        async with self._session() as (channel, queue):
            exchange = await channel.get_exchange(self._topology.exchange, ensure=False)
            for group in (await _originals(queue))[:limit]:
                incoming = group[0]
                letter = amqp.dead_letter_of(incoming)
                message_id = letter.message_id or f"(no id, tag {incoming.delivery_tag})"
                try:
                    validate(Message(letter.body, letter.attributes, letter.message_id))
                except Exception as exc:
                    report.invalid[message_id] = str(exc)
                    continue
                if not dry_run:
                    routing_key = letter.extra.get("routing_key") or letter.attributes.get(TYPE_ATTR, "")
                    try:
                        await exchange.publish(
                            amqp.replay_copy(incoming), routing_key=routing_key, mandatory=True
                        )
                    except Exception as exc:  # not confirmed / unroutable: it stays dead-lettered
                        report.invalid[message_id] = (
                            f"could not publish to {self._topology.exchange}: {exc!r}"
                        )
                        continue
                    for copy in group:
                        await copy.ack()
                    log.info("dlq.replayed", message_id=letter.message_id, routing_key=routing_key,
                             copies=len(group))  # fmt: skip
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


async def _originals(queue: AbstractQueue) -> list[list[AbstractIncomingMessage]]:
    """Every dead letter, held, grouped by original message (oldest first). A session's channel holds
    what it took until it closes, so a replayed copy that comes back to the DLQ is not taken again by
    the same run."""
    return by_original([m async for m in _take(queue, None)], amqp.dead_letter_of)


async def _take(queue: AbstractQueue, limit: int | None) -> AsyncIterator[AbstractIncomingMessage]:
    """Oldest first, each held (unacked) until the session's channel closes."""
    count = 0
    while limit is None or count < limit:
        incoming = await queue.get(no_ack=False, fail=False, timeout=10)
        if incoming is None:
            return
        count += 1
        yield incoming
