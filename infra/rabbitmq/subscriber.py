"""Consumes the main queue and maps each outcome onto RabbitMQ - the only place incidentd acks.

``application.settle`` decides; this module provides its three operations:

* ack -> coalesced ``basic.ack`` (below);
* requeue -> ``basic.nack(requeue=True)`` (a hand-back; ``x-delivery-count`` is not incidentd's attempt);
* publish_copy -> a RETRY's copy to the retry queue for its delay, a DEAD_LETTER's copy to
  ``<queue>.dlq``, through the confirming publish channel. No copy is published for a delivery whose
  channel has closed: RabbitMQ has requeued it already.

Acks are coalesced per channel (see :class:`Acks`): one ``basic.ack(multiple=True)`` covers a contiguous
run of finished deliveries, which is what lets the worker beat a plain per-message-ack consumer.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from aio_pika.exceptions import ChannelInvalidStateError

from application.messages import Delivery, Disposition, Message, Outcome
from infra.rabbitmq import message as amqp

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

    from infra.rabbitmq.topology import Topology

log = structlog.get_logger("incidentd.rabbitmq")

CLOSE_ROUND_TRIP_TIMEOUT = 5.0  # for the synchronous round trip after the last ack, before the close
# Delivery states in an Acks window.
_RUNNING, _TO_ACK, _SETTLED = 0, 1, 2


class RabbitDelivery:
    """``ack`` is buffered and sent within the ack interval (or by ``close()``); ``requeue`` is a nack
    with requeue, sent at once; ``publish_copy`` returns once RabbitMQ confirmed the copy."""

    __slots__ = ("_acks", "_subscriber", "incoming", "message", "state", "tag")

    def __init__(
        self, message: Message, incoming: AbstractIncomingMessage, subscriber: RabbitSubscriber, acks: Acks
    ) -> None:
        self.message = message
        self.incoming = incoming
        self.tag: int = incoming.delivery_tag or 0
        self.state = _RUNNING
        self._subscriber = subscriber
        self._acks = acks

    async def ack(self) -> None:
        self._acks.finished(self)

    async def requeue(self) -> None:
        await self._acks.nack(self)

    async def publish_copy(self, attributes: Mapping[str, str], outcome: Outcome) -> None:
        if self._acks.channel.is_closed:  # RabbitMQ has requeued the original: a copy would be a twin
            raise ChannelInvalidStateError("the delivery's channel is closed; RabbitMQ redelivers it")
        await self._subscriber.publish_copy(self, attributes, outcome)


class Acks:
    """The unsettled deliveries of one channel, in delivery-tag order, and their coalesced acks.

    ``basic.ack(multiple=True)`` with tag T acks *every* unacked delivery <= T on the channel, so T may
    only be the last of a run of finished deliveries that starts at the oldest unsettled one. Deliveries
    finished behind a still-running one (out-of-order completion) are acked one by one when the timer
    fires, so a slow handler never holds the prefetch window shut. Every frame goes out under one lock, in
    order, so a multiple-ack can never overtake (and double-ack) an earlier single ack or nack.

    When the channel has died (connection loss), its deliveries cannot be acked any more; RabbitMQ
    redelivers them on the new channel, so the window is dropped with a warning, not an error.
    """

    def __init__(self, channel: Any, batch: int, interval: float) -> None:
        self.channel = channel  # the aiormq channel these delivery tags belong to
        self._window: collections.deque[RabbitDelivery] = collections.deque()
        self._ready = 0  # finished, not yet acked
        self._batch = batch
        self._interval = interval
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    def add(self, delivery: RabbitDelivery) -> None:
        window = self._window
        if window and window[-1].tag > delivery.tag:  # never seen (callbacks run in delivery order)
            at = next(i for i, d in enumerate(window) if d.tag > delivery.tag)
            window.insert(at, delivery)  # keep tag order: a multiple-ack must not pass an unfinished one
            return
        window.append(delivery)

    def finished(self, delivery: RabbitDelivery) -> None:
        if delivery.state != _RUNNING:  # dropped with its dead channel; RabbitMQ redelivers it
            return
        delivery.state = _TO_ACK
        self._ready += 1
        loop = asyncio.get_running_loop()
        if self._ready >= self._batch and self._flushing is None:
            self._flushing = loop.create_task(self._flush_task(stragglers=False))
        # Always a timer while anything is ready: the batch flush leaves stragglers behind a slow one.
        if self._timer is None:
            self._timer = loop.call_later(self._interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_task(stragglers=True))
        else:  # a flush is running; come back for what it leaves
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._on_timer)

    async def _flush_task(self, *, stragglers: bool) -> None:
        try:
            await self.flush(stragglers=stragglers)
        finally:
            self._flushing = None

    async def flush(self, *, stragglers: bool = True) -> None:
        async with self._lock:
            try:
                await self._send_acks(stragglers)
            except Exception as exc:  # channel gone: RabbitMQ redelivers everything unacked on it
                self._drop(exc)

    async def _send_acks(self, stragglers: bool) -> None:
        window = self._window
        last: RabbitDelivery | None = None
        while window and window[0].state != _RUNNING:
            delivery = window.popleft()
            if delivery.state == _TO_ACK:
                last = delivery
                self._ready -= 1
        if last is not None:
            await last.incoming.ack(multiple=True)
        if stragglers and self._ready:
            for delivery in [d for d in window if d.state == _TO_ACK]:
                delivery.state = _SETTLED
                self._ready -= 1
                await delivery.incoming.ack()

    async def nack(self, delivery: RabbitDelivery) -> None:
        """Requeue one delivery at once (not handed over at stop, or its copy was not confirmed)."""
        async with self._lock:
            if delivery.state != _RUNNING:
                return
            delivery.state = _SETTLED
            try:
                await delivery.incoming.nack(requeue=True)
            except Exception as exc:
                self._drop(exc)

    def _drop(self, exc: Exception) -> None:
        if self._window:
            log.warning(
                "rabbitmq.acks_lost_with_channel", unsettled=len(self._window), error=repr(exc),
                note="RabbitMQ redelivers them",
            )  # fmt: skip
        for delivery in self._window:
            delivery.state = _SETTLED
        self._window.clear()
        self._ready = 0

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush(stragglers=True)


class RabbitSubscriber:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        publish_channel: AbstractChannel,
        *,
        prefetch: int,
        ack_interval: float = 0.01,
        confirm_timeout: float = 10.0,
    ) -> None:
        self._connection = connection
        # How long a retry / dead-letter copy may wait for its confirm. A blocked broker (memory or disk
        # alarm) never confirms; without a bound the settle, and so the shutdown drain, would wait until
        # the kubelet's SIGKILL. Past it the original is handed back (nack, requeue) instead.
        self._confirm_timeout = confirm_timeout
        self._topology = topology
        self._publish_channel = publish_channel
        self._prefetch = prefetch
        self._ack_batch = max(1, prefetch // 8)
        self._ack_interval = ack_interval
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._on_delivery: Callable[[Delivery], None] | None = None
        self._acks: Acks | None = None
        self._all_acks: list[Acks] = []
        self._stopping = False

    @property
    def connected(self) -> bool:
        """Consuming over an open connection (the readiness probe)."""
        return (
            self._consumer_tag is not None
            and not self._stopping
            and self._connection.connected.is_set()
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        from infra.rabbitmq.topology import declare_main_queue

        self._on_delivery = on_delivery
        self._stopping = False
        self._channel = await self._connection.channel(publisher_confirms=False)
        await self._channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await declare_main_queue(self._channel, self._topology)
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("rabbitmq.consuming", queue=self._topology.queue, prefetch=self._prefetch)

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        try:
            acks = self._acks_for(incoming)
        except ChannelInvalidStateError:
            return  # its channel died before we saw it; RabbitMQ redelivers it
        delivery = RabbitDelivery(amqp.to_message(incoming), incoming, self, acks)
        acks.add(delivery)
        if self._stopping or self._on_delivery is None:
            await acks.nack(delivery)
            return
        self._on_delivery(delivery)

    def _acks_for(self, incoming: AbstractIncomingMessage) -> Acks:
        channel = incoming.channel  # the channel (of this connection) the delivery tag belongs to
        acks = self._acks
        if acks is None or acks.channel is not channel:
            acks = self._acks = Acks(channel, self._ack_batch, self._ack_interval)
            self._all_acks = [a for a in self._all_acks if not a.channel.is_closed] + [acks]
        return acks

    async def publish_copy(
        self, delivery: RabbitDelivery, attributes: Mapping[str, str], outcome: Outcome
    ) -> None:
        """Publish the copy that replaces a delivery and wait for RabbitMQ's confirm."""
        if outcome.disposition is Disposition.RETRY:
            target = self._topology.retry_target(outcome.delay)
        else:
            target = self._topology.dlq
        headers = dict(attributes) | amqp.provenance(delivery.incoming, attributes)
        await self._publish_channel.default_exchange.publish(
            amqp.copy_of(delivery.incoming, headers), routing_key=target, mandatory=True,
            timeout=self._confirm_timeout,
        )  # fmt: skip

    async def stop(self) -> None:
        """Stop consuming; deliveries that arrive from now on are requeued at once."""
        self._stopping = True
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag, timeout=5)
            except Exception as exc:  # connection down: the broker has dropped the consumer already
                log.warning("rabbitmq.cancel_failed", error=repr(exc))
        self._consumer_tag = None

    async def close(self) -> None:
        """Send every buffered ack, make sure RabbitMQ has processed them, then close the consumer channel
        (anything unacked goes back).

        A quorum queue can drop acks still in flight when their channel closes (rabbitmq-server#10327):
        a rolling restart then redelivered dozens of deliveries the stopping worker had settled. So after
        the last ack, one synchronous round trip on that same channel (``basic.qos``, answered only after
        every frame before it was processed), and only then ``channel.close``."""
        for acks in self._all_acks:
            await acks.close()
        self._all_acks = []
        self._acks = None
        channel, self._channel = self._channel, None
        if channel is None or channel.is_closed:
            return
        try:
            await asyncio.wait_for(channel.set_qos(prefetch_count=self._prefetch), CLOSE_ROUND_TRIP_TIMEOUT)
        except Exception as exc:  # channel or connection gone: RabbitMQ redelivers what was not acked
            log.warning("rabbitmq.ack_round_trip_failed", error=repr(exc))
        if not channel.is_closed:
            await channel.close()
