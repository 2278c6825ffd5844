"""Consumes the subscription by streaming pull and maps each outcome onto Pub/Sub - the only place
incidentd acks.

``application.settle`` decides; this module provides its three operations:

* ack -> ``message.ack()``: the client batches acks on its dispatcher thread (up to 100 per request,
  10 ms), which is what keeps the worker at the plain client's speed. With exactly-once delivery
  enabled on the subscription, ``ack_with_response()`` instead, awaited: there an ack can fail.
* requeue -> nack: redelivered at once, to any worker. Pub/Sub's ``delivery_attempt`` counts it, which
  is why incidentd's attempt is its own attribute only.
* publish_copy -> a RETRY's copy (attempt + 1, ``x-incidentd-not-before``) to the topic, a
  DEAD_LETTER's to the dead-letter topic, returning once published. A retry copy that arrives before it
  is due is *parked*: its ack deadline is set to the time left (at most 600 s, which is also the longest
  retry delay, so a copy is parked at most once) and it is dropped from lease management, so Pub/Sub
  redelivers it when it is due. Why a copy, and not a nack or a modified deadline on the original: our
  attempt count travels with the copy, so counting works on every subscription and parks never count;
  the subscription's native dead_letter_policy sees each copy as a new message and stays a backstop.

A message whose hand-over fails for any reason is nacked on its own; the rest of its batch is handed
over (a message with unreadable attributes is handed over and dead-lettered by the dispatcher).

Threads: the client calls ``Scheduler.schedule`` on its own threads for each message it releases. The
:class:`LoopScheduler` given to ``subscribe`` only appends the message to a list and, for the first of a
batch, wakes the event loop (``call_soon_threadsafe``); it never blocks a client thread and there is no
thread pool hop. Everything else (handing over, settling) happens on the loop's thread.

Shutdown (the trap of googleapis/python-pubsub#150, #276, #423: after ``future.cancel()`` the client's
dispatcher thread stops and acks queued later are silently dropped; closing the client before the
shutdown finished loses even the earlier ones):

1. ``stop()`` marks the stream closed and cancels it. From then on every settle of this stream goes out
   as a unary RPC of our own (:class:`UnaryRequests`), and a lease keeper extends the deadlines of the
   deliveries still running, since the client's leaser stops with the stream. The client's shutdown
   nacks what it still holds (the scheduler's batch not handed over, messages on hold) and flushes every
   request queued before it, then resolves the future.
2. The dispatcher drains (handlers finish or are cancelled and handed back).
3. ``close()`` waits for the future (the flush above), sends our last requests, and only then does the
   broker close the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from google.cloud.pubsub_v1.subscriber.scheduler import Scheduler

from application import settle
from application.messages import Delivery, Disposition, Message, Outcome
from infra.pubsub import message as pubsub
from infra.pubsub.topology import MAX_ACK_DEADLINE

if TYPE_CHECKING:
    import queue

    from google.cloud.pubsub_v1 import SubscriberClient
    from google.cloud.pubsub_v1.subscriber.futures import StreamingPullFuture
    from google.cloud.pubsub_v1.subscriber.message import Message as Received
    from google.cloud.pubsub_v1.types import FlowControl

    from infra.pubsub.publisher import PubSubPublisher
    from infra.pubsub.topology import Topology

log = structlog.get_logger("incidentd.pubsub")

# While draining: how often the lease keeper extends the running deliveries, and by how much.
DRAIN_LEASE_INTERVAL = 5.0
DRAIN_LEASE_SECONDS = 30
RESUBSCRIBE_DELAY = 5.0  # after the stream ended on its own (e.g. the subscription was deleted)
CLOSE_TIMEOUT = 30.0  # for the client's own shutdown of the stream
PARK_MINIMUM = 0.5  # a copy due sooner than this is handled at once
HALF_CLOSE_POLL = 0.01  # how often a paused consumer is resumed while the half-closed stream ends


class LoopScheduler(Scheduler):  # type: ignore[misc]  # the client ships no type hints here
    """Hands the client's messages to the event loop in batches, without a thread pool.

    ``schedule`` runs on the client's threads (under its flow-control lock): it appends and, when the
    batch was empty, schedules one hand-over on the loop. ``shutdown`` returns what was not handed over
    yet; the client nacks those.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, hand_over: Callable[[LoopScheduler, list[Received]], None]
    ) -> None:
        import queue

        self._queue: queue.Queue[Any] = queue.Queue()
        self._loop = loop
        self._hand_over = hand_over
        self._lock = threading.Lock()
        self._batch: list[Received] = []
        self._shut = False
        self.live = True  # settles go through the client's queue; False once the stream is closing
        self.exactly_once = False

    @property
    def queue(self) -> queue.Queue[Any]:
        """The client's request queue (acks, nacks, lease extensions), read by its dispatcher thread."""
        return self._queue

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        received = args[0]
        with self._lock:
            if self._shut:
                received.nack()
                return
            self._batch.append(received)
            first = len(self._batch) == 1
        if first:
            try:
                self._loop.call_soon_threadsafe(self._run)
            except RuntimeError:  # the loop is closed: the process is exiting; give it back
                self.shutdown()
                received.nack()

    def _run(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
        if batch:
            self.exactly_once = batch[0].exactly_once_enabled
            self._hand_over(self, batch)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Received]:
        with self._lock:
            self._shut = True
            dropped, self._batch = self._batch, []
        return dropped


class PubSubDelivery:
    __slots__ = ("_subscriber", "message", "received", "stream")

    def __init__(
        self, message: Message, received: Received, stream: LoopScheduler, subscriber: PubSubSubscriber
    ) -> None:
        self.message = message
        self.received = received
        self.stream = stream
        self._subscriber = subscriber

    async def ack(self) -> None:
        """Returns once the ack is queued in the client (sent within 10 ms, or flushed by ``close()``);
        while stopping, once our own request was answered."""
        await self._subscriber.ack(self)

    async def requeue(self) -> None:
        await self._subscriber.nack(self)

    async def publish_copy(self, attributes: Mapping[str, str], outcome: Outcome) -> None:
        await self._subscriber.publish_copy(self, attributes, outcome)


class UnaryRequests:
    """Acks and deadline changes as unary RPCs of our own, coalesced per ``interval`` (used once the
    stream is closing, when the client's dispatcher no longer sends them). One request at a time, in
    order, so a lease extension can never overtake (and undo) a nack sent before it."""

    def __init__(self, client: SubscriberClient, subscription: str, *, interval: float = 0.01) -> None:
        self._client = client
        self._subscription = subscription
        self._interval = interval
        self._pending: dict[int | None, tuple[list[str], asyncio.Future[None]]] = {}  # seconds -> ids
        self._lock = asyncio.Lock()

    def ack(self, ack_id: str) -> Awaitable[None]:
        return self._add(None, ack_id)

    def modify(self, ack_id: str, seconds: int) -> Awaitable[None]:
        return self._add(seconds, ack_id)

    def _add(self, seconds: int | None, ack_id: str) -> asyncio.Future[None]:
        if seconds not in self._pending:
            loop = asyncio.get_running_loop()
            self._pending[seconds] = ([], loop.create_future())
            loop.call_later(self._interval, lambda: loop.create_task(self._send(seconds)))
        ids, done = self._pending[seconds]
        ids.append(ack_id)
        return done

    async def _send(self, seconds: int | None) -> None:
        entry = self._pending.pop(seconds, None)
        if entry is None:
            return
        ids, done = entry
        try:
            async with self._lock:
                await asyncio.to_thread(self.send, ids, seconds)
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
            done.exception()  # retrieved here: a caller that stopped waiting must not warn
            return
        if not done.done():
            done.set_result(None)

    def send(self, ack_ids: list[str], seconds: int | None) -> None:
        """Blocking; in chunks of 1000 ids (the client's own request size)."""
        for start in range(0, len(ack_ids), 1000):
            chunk = ack_ids[start : start + 1000]
            if seconds is None:
                self._client.acknowledge(subscription=self._subscription, ack_ids=chunk, timeout=30)
            else:
                self._client.modify_ack_deadline(
                    subscription=self._subscription, ack_ids=chunk, ack_deadline_seconds=seconds,
                    timeout=30,
                )  # fmt: skip

    async def extend(self, ack_ids: Callable[[], list[str]], seconds: int) -> None:
        """Extend the leases of ``ack_ids()``, read once every request before has been sent."""
        async with self._lock:
            ids = ack_ids()
            if ids:
                await asyncio.to_thread(self.send, ids, seconds)

    async def flush(self) -> None:
        for seconds in list(self._pending):
            await self._send(seconds)


class PubSubSubscriber:
    def __init__(
        self,
        client: SubscriberClient,
        topology: Topology,
        publisher: PubSubPublisher,
        flow_control: FlowControl,
    ) -> None:
        self._client = client
        self._topology = topology
        self._publisher = publisher
        self._flow_control = flow_control
        self._unary = UnaryRequests(client, topology.subscription_path)
        self._on_delivery: Callable[[Delivery], None] | None = None
        self._stream: LoopScheduler | None = None
        self._future: StreamingPullFuture | None = None
        self._closing: list[StreamingPullFuture] = []  # cancelled streams whose shutdown is not awaited
        self._stopping = False
        self._lease_keeper: asyncio.Task[None] | None = None
        self._resubscribe: asyncio.TimerHandle | None = None
        self.unsettled: set[PubSubDelivery] = set()  # handed over, not settled yet
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        """A streaming pull is open (the client reconnects a broken stream itself; it ends the stream
        only on a permanent error, e.g. a missing subscription or no permission)."""
        return (
            not self._stopping
            and self._future is not None
            and not self._future.done()
            and self._stream is not None
            and self._stream.live
        )

    async def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self._on_delivery = on_delivery
        self._stopping = False
        self._subscribe()
        log.info("pubsub.consuming", subscription=self._topology.subscription_path,
                 max_messages=self._flow_control.max_messages)  # fmt: skip

    def _subscribe(self) -> None:
        loop = asyncio.get_running_loop()
        stream = self._stream = LoopScheduler(loop, self._hand_over)
        future = self._future = self._client.subscribe(
            self._topology.subscription_path, callback=_handled_by_scheduler,
            flow_control=self._flow_control, scheduler=stream,
        )  # fmt: skip

        def ended(_: object) -> None:  # on a client thread
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._stream_ended, stream, future)

        future.add_done_callback(ended)

    def _stream_ended(self, stream: LoopScheduler, future: StreamingPullFuture) -> None:
        if not stream.live:
            return  # stop() or close() cancelled it
        stream.live = False  # its dispatcher is gone: settle the rest with our own requests
        self._closing.append(future)
        self._keep_leases_of_closed_streams()  # and its leaser: running handlers keep their leases
        error = future.exception(timeout=0)
        log.error("pubsub.stream_ended", error=repr(error), resubscribe_in=RESUBSCRIBE_DELAY)
        if not self._stopping:
            self._resubscribe = asyncio.get_running_loop().call_later(RESUBSCRIBE_DELAY, self._again)

    def _again(self) -> None:
        self._resubscribe = None
        if not self._stopping:
            self._subscribe()

    def _hand_over(self, stream: LoopScheduler, batch: list[Received]) -> None:
        on_delivery = self._on_delivery
        for received in batch:
            try:
                due_in = settle.due_in(received.attributes)
                if due_in >= PARK_MINIMUM:
                    self._park(stream, received, due_in)
                    continue
                if not stream.live or on_delivery is None:
                    self._nack_direct(received.ack_id)
                    continue
                delivery = PubSubDelivery(pubsub.to_message(received), received, stream, self)
                self.unsettled.add(delivery)
                on_delivery(delivery)
            except Exception as exc:  # one message must never strand the rest of its batch
                log.exception("pubsub.hand_over_failed", error=repr(exc))
                self._nack_direct(received.ack_id)

    def _park(self, stream: LoopScheduler, received: Received, due_in: float) -> None:
        """Leave a RETRY's early copy with Pub/Sub until it is due (its ack deadline), unleased."""
        seconds = min(MAX_ACK_DEADLINE, math.ceil(due_in))
        if stream.live:
            received.modify_ack_deadline(seconds)
            received.drop()
        else:
            self._background(self._unary.modify(received.ack_id, seconds))

    def _nack_direct(self, ack_id: str) -> None:
        self._background(self._unary.modify(ack_id, 0))

    def _background(self, request: Awaitable[None]) -> None:
        async def send() -> None:
            try:
                await request
            except Exception as exc:  # the lease runs out and Pub/Sub redelivers: nothing is lost
                log.warning("pubsub.request_failed", error=repr(exc))

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ack(self, delivery: PubSubDelivery) -> None:
        self.unsettled.discard(delivery)
        received = delivery.received
        if not delivery.stream.live:
            await self._unary.ack(received.ack_id)
        elif delivery.stream.exactly_once:
            await asyncio.wrap_future(received.ack_with_response())
        else:
            received.ack()

    async def nack(self, delivery: PubSubDelivery) -> None:
        self.unsettled.discard(delivery)
        received = delivery.received
        if delivery.stream.live:
            received.nack()
        else:
            await self._unary.modify(received.ack_id, 0)

    async def publish_copy(
        self, delivery: PubSubDelivery, attributes: Mapping[str, str], outcome: Outcome
    ) -> None:
        """Publish the copy that replaces a delivery and wait until Pub/Sub has it."""
        if outcome.disposition is Disposition.RETRY:
            topic = self._topology.topic_path
        else:
            topic = self._topology.dead_letter_topic_path
        copy = pubsub.copy_attributes(
            attributes, delivery.message, outcome, delivery.received.message_id, self._topology.subscription
        )
        await self._publisher.publish_to(topic, delivery.message.body, copy)

    async def stop(self) -> None:
        """Stop the stream; its held and not handed-over messages are nacked by the client at once,
        running deliveries settle through our own requests and keep their leases until settled."""
        self._stopping = True
        if self._resubscribe is not None:
            self._resubscribe.cancel()
            self._resubscribe = None
        await self._cancel_stream()
        self._keep_leases_of_closed_streams()

    def _keep_leases_of_closed_streams(self) -> None:
        if self._lease_keeper is None:
            self._lease_keeper = asyncio.get_running_loop().create_task(self._keep_leases())

    async def _cancel_stream(self) -> None:
        if self._stream is not None and self._stream.live:
            self._stream.live = False  # before cancel(): every later settle is a request of our own
            assert self._future is not None
            await _half_close(self._future)
            self._future.cancel()
            self._closing.append(self._future)

    async def _keep_leases(self) -> None:
        """While draining, or after a stream ended on its own: the client's leaser has stopped with the
        stream, so extend the deadlines of the deliveries still running ourselves (a settled one is out
        of ``unsettled`` before its ack or nack is queued)."""

        def running() -> list[str]:
            return [d.received.ack_id for d in self.unsettled if not d.stream.live]

        while True:
            try:
                await self._unary.extend(running, DRAIN_LEASE_SECONDS)
            except Exception as exc:
                log.warning("pubsub.lease_extension_failed", error=repr(exc))
            await asyncio.sleep(DRAIN_LEASE_INTERVAL)

    async def close(self) -> None:
        """Wait for the client's shutdown of the stream (it flushes the acks queued before it), hand
        back anything still unsettled, and send our own last requests."""
        self._stopping = True
        await self._cancel_stream()
        if self._lease_keeper is not None:
            self._lease_keeper.cancel()
            self._lease_keeper = None
        for future in self._closing:
            try:
                await asyncio.to_thread(future.result, CLOSE_TIMEOUT)
            except Exception as exc:
                log.warning("pubsub.stream_shutdown", error=repr(exc))
        self._closing = []
        for delivery in list(self.unsettled):  # none after a drain; handed back, never left leased
            self._nack_direct(delivery.received.ack_id)
        self.unsettled.clear()
        await self._unary.flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _handled_by_scheduler(received: Received) -> None:
    """Never called: :class:`LoopScheduler` hands messages to the event loop itself."""
    raise AssertionError("LoopScheduler does not call the message callback")


async def _half_close(future: StreamingPullFuture, timeout: float = 2.0) -> None:
    """End the stream from our side first and give the server ``timeout`` to finish it, before
    ``cancel()`` resets it.

    For the emulator (google-cloud-cli-pubsub-emulator 528, cloud-pubsub-emulator 0.8.20): it fails on a
    client's RST_STREAM (``NoSuchMethodError`` in ``onRstStreamRead`` in its log) and never forgets the
    cancelled stream, which keeps being assigned messages until their ack deadline lapses. A half-close
    it handles: it completes the stream. Pub/Sub itself takes either. This reaches into the client's
    internals (the bidi RPC's request queue, where ``None`` ends the request stream); if they are not
    there, only ``cancel()`` is used.

    The end of the stream arrives only after the responses the server sent before it, so the client's
    consumer must keep reading them. The emulator ignores flow control, and with ``max_messages`` leased
    the client pauses its consumer: the end never arrives, ``cancel()`` follows, and what the emulator
    sent into that stream comes back only when its ack deadline lapses (tests/ops/test_rolling_restart.py
    saw this under load). So the consumer is resumed until the stream ends (flow control pauses it again
    after each response); what it reads is on hold, and the client's shutdown nacks it.
    """
    manager = getattr(future, "_StreamingPullFuture__manager", None)
    rpc = getattr(manager, "_rpc", None)
    requests = getattr(rpc, "_request_queue", None)
    call = getattr(rpc, "call", None)
    call = getattr(call, "_wrapped", call)  # api_core wraps the grpc call
    if requests is None or call is None or not hasattr(call, "add_done_callback"):
        return
    loop, ended = asyncio.get_running_loop(), asyncio.Event()
    call.add_done_callback(lambda _: loop.call_soon_threadsafe(ended.set))
    requests.put(None)
    consumer = getattr(manager, "_consumer", None)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not ended.is_set():
                if consumer is not None and getattr(consumer, "is_paused", False):
                    consumer.resume()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), HALF_CLOSE_POLL)
