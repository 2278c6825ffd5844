"""Consumes incidentd's subscriptions by streaming pull and maps each outcome onto Pub/Sub - the only
place incidentd acks.

``application.settle`` decides; :class:`PubSubDelivery` provides its three operations:

* ack -> ``message.ack()``: the client batches acks on its dispatcher thread (up to 100 per request,
  10 ms), which keeps the worker at the plain client's speed. With exactly-once delivery enabled on the
  subscription, ``ack_with_response()`` instead, awaited: there an ack can fail.
* requeue -> nack: redelivered at once, to any worker. Pub/Sub's ``delivery_attempt`` counts it, which
  is why incidentd's attempt is its own attribute only.
* publish_copy -> a RETRY's copy (attempt + 1, ``x-incidentd-not-before``) to incidentd's retry topic,
  a DEAD_LETTER's to the dead-letter topic, returning once published. A retry copy that arrives before
  it is due is *parked*: its ack deadline is set to the time left (at most 600 s, also the longest retry
  delay, so a copy is parked at most once) and it is dropped from lease management.

Two streams, one per subscription: the main one and the retry one (``infra/pubsub/topology.py``).

Threads: the client calls ``Scheduler.schedule`` on its own threads for each message it releases.
:class:`Stream` only appends the message to a list and, for the first of a batch, wakes the event loop;
it never blocks a client thread and there is no thread pool hop.

Shutdown: pause on stop, close at the end. ``stop()`` pauses hand-over: what the client releases from
then on stays in the stream's list, still leased and counted by flow control. The stream stays open
while the dispatcher drains, so every settle goes through the client's own machinery (its dispatcher
thread sends acks and nacks, its leaser keeps the leases of running handlers). ``close()`` runs after
the drain, when every settle is queued: it ends the stream, and the client's shutdown nacks what it
holds and flushes every queued request before the stream's future resolves (acks queued *after* that
shutdown would be dropped: googleapis/python-pubsub#150, #276, #423 - none are).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Callable, Coroutine, Mapping
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

CLOSE_TIMEOUT = 30.0  # for the client's shutdown of a stream (the worker's close share cuts it shorter)
RESUBSCRIBE_DELAY = 5.0  # after a stream ended on its own (e.g. the subscription was deleted)
PARK_MINIMUM = 0.5  # a copy due sooner than this is handled at once
# After a stream ended on its own: how often, and by how much, the leases of its running handlers
# are extended (its client leaser is gone).
ORPHAN_LEASE_INTERVAL = 5.0
ORPHAN_LEASE_SECONDS = 30


class Stream(Scheduler):  # type: ignore[misc]  # the client ships no type hints here
    """One streaming pull: the scheduler the client hands messages to, and what incidentd knows of it.

    ``schedule`` runs on the client's threads: it appends and, when the batch was empty, schedules one
    hand-over on the loop. Once ``paused``, nothing more is handed over; ``shutdown`` (the client's, at
    close) returns what was not handed over and the client nacks it.
    """

    def __init__(
        self, path: str, loop: asyncio.AbstractEventLoop, hand_over: Callable[[Stream, list[Received]], None]
    ) -> None:
        import queue

        self.path = path
        self._queue: queue.Queue[Any] = queue.Queue()
        self._loop = loop
        self._hand_over = hand_over
        self._lock = threading.Lock()
        self._batch: list[Received] = []
        self._shut = False
        self.paused = False
        self.closing = False  # closed by close(), not ended on its own
        self.ended = False  # the client's threads are gone: settle with requests of our own
        self.exactly_once = False
        self.future: StreamingPullFuture | None = None
        self.unsettled: set[PubSubDelivery] = set()  # handed over, not settled yet

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
            with contextlib.suppress(RuntimeError):  # the loop is closed: the client's shutdown nacks it
                self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        if self.paused:
            return  # held: still leased and counted by flow control; nacked by the client's shutdown
        with self._lock:
            batch, self._batch = self._batch, []
        if batch:
            self.exactly_once = batch[0].exactly_once_enabled
            self._hand_over(self, batch)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Received]:
        with self._lock:
            self._shut = True
            held, self._batch = self._batch, []
        return held

    @property
    def manager(self) -> Any:
        """The client's streaming pull manager (private): for the emulator's half-close and held
        messages. None if the client's internals changed."""
        return getattr(self.future, "_StreamingPullFuture__manager", None)


class PubSubDelivery:
    __slots__ = ("_subscriber", "message", "received", "stream")

    def __init__(
        self, message: Message, received: Received, stream: Stream, subscriber: PubSubSubscriber
    ) -> None:
        self.message = message
        self.received = received
        self.stream = stream
        self._subscriber = subscriber

    async def ack(self) -> None:
        """Returns once the ack is queued in the client (sent within 10 ms, flushed by ``close()``)."""
        self.stream.unsettled.discard(self)
        if self.stream.ended:
            await self._subscriber.request(self.stream, [self.received.ack_id], None)
        elif self.stream.exactly_once:
            await asyncio.wrap_future(self.received.ack_with_response())
        else:
            self.received.ack()

    async def requeue(self) -> None:
        self.stream.unsettled.discard(self)
        if self.stream.ended:
            await self._subscriber.request(self.stream, [self.received.ack_id], 0)
        else:
            self.received.nack()

    async def publish_copy(self, attributes: Mapping[str, str], outcome: Outcome) -> None:
        await self._subscriber.publish_copy(self, attributes, outcome)


class PubSubSubscriber:
    def __init__(
        self,
        client: SubscriberClient,
        topology: Topology,
        publisher: PubSubPublisher,
        flow_control: FlowControl,
        *,
        keep_reading: bool = False,
    ) -> None:
        self._client = client
        self._topology = topology
        self._publisher = publisher
        self._flow_control = flow_control
        self._keep_reading = keep_reading  # for the emulator: see _never_pause
        self._on_delivery: Callable[[Delivery], None] | None = None
        self._streams: dict[str, Stream] = {}  # by subscription path
        self._stopping = False
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._requests = asyncio.Lock()  # our own requests go one at a time, in order

    @property
    def connected(self) -> bool:
        """Every streaming pull is open (the client reconnects a broken stream itself; it ends a stream
        only on a permanent error, e.g. a missing subscription or no permission)."""
        streams = self._streams.values()
        return not self._stopping and len(streams) == 2 and not any(s.ended for s in streams)

    async def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self._on_delivery = on_delivery
        self._stopping = False
        for path in (self._topology.subscription_path, self._topology.retry_subscription_path):
            self._subscribe(path)
        log.info("pubsub.consuming", subscription=self._topology.subscription_path,
                 retry_subscription=self._topology.retry_subscription_path,
                 max_messages=self._flow_control.max_messages)  # fmt: skip

    def _subscribe(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        stream = self._streams[path] = Stream(path, loop, self._hand_over)
        stream.future = self._client.subscribe(
            path, callback=_handled_by_scheduler, flow_control=self._flow_control, scheduler=stream
        )
        if self._keep_reading:
            _never_pause(stream.manager)

        def ended(_: object) -> None:  # on a client thread, once the client's shutdown has finished
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._stream_ended, path, stream)

        stream.future.add_done_callback(ended)

    def _stream_ended(self, path: str, stream: Stream) -> None:
        stream.ended = True  # its dispatcher is gone: the rest settles with requests of our own
        if stream.closing:
            return
        assert stream.future is not None
        log.error("pubsub.stream_ended", subscription=path, error=repr(stream.future.exception(timeout=0)),
                  resubscribe_in=RESUBSCRIBE_DELAY)  # fmt: skip
        self._background(self._keep_leases(stream))  # its leaser is gone too
        if not self._stopping:
            self._resubscribe_later(path)

    def _resubscribe_later(self, path: str) -> None:
        def again() -> None:
            self._timers.discard(timer)
            if not self._stopping:
                self._subscribe(path)

        timer = asyncio.get_running_loop().call_later(RESUBSCRIBE_DELAY, again)
        self._timers.add(timer)

    def _hand_over(self, stream: Stream, batch: list[Received]) -> None:
        for received in batch:
            try:
                due_in = settle.due_in(received.attributes)
                if due_in >= PARK_MINIMUM:  # a RETRY's copy, early: leave it with Pub/Sub until due
                    received.modify_ack_deadline(min(MAX_ACK_DEADLINE, math.ceil(due_in)))
                    received.drop()
                    continue
                delivery = PubSubDelivery(pubsub.to_message(received), received, stream, self)
                stream.unsettled.add(delivery)
                assert self._on_delivery is not None
                self._on_delivery(delivery)
            except Exception as exc:  # one message must never strand the rest of its batch
                log.exception("pubsub.hand_over_failed", error=repr(exc))
                received.nack()

    async def publish_copy(
        self, delivery: PubSubDelivery, attributes: Mapping[str, str], outcome: Outcome
    ) -> None:
        """Publish the copy that replaces a delivery and wait until Pub/Sub has it. A retry copy goes to
        incidentd's retry topic, so the main topic's other subscriptions never see it."""
        if outcome.disposition is Disposition.RETRY:
            topic = self._topology.retry_topic_path
        else:
            topic = self._topology.dead_letter_topic_path
        copy = pubsub.copy_attributes(
            attributes, delivery.message, outcome, delivery.received.message_id, self._topology.subscription
        )
        await self._publisher.publish_to(topic, delivery.message.body, copy)

    async def stop(self) -> None:
        """Stop intake: hand nothing more over. The streams stay open for the drain's settles."""
        self._stopping = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for path, stream in self._streams.items():
            stream.paused = True
            log.info("pubsub.paused", subscription=path, running=len(stream.unsettled), **_held(stream))

    async def close(self) -> None:
        """End every stream (the client nacks what it holds and flushes every request queued before),
        then hand back anything still unsettled (nothing after a drain)."""
        self._stopping = True
        streams, self._streams = list(self._streams.values()), {}
        try:
            await asyncio.gather(*(self._end(stream) for stream in streams))
        finally:  # out of time (the worker's close share): still end every stream, without waiting
            for stream in streams:
                if stream.future is not None:
                    stream.future.cancel()
        for stream in streams:
            left, stream.unsettled = [d.received.ack_id for d in stream.unsettled], set()
            if left:
                with contextlib.suppress(Exception):  # else their leases lapse: redelivered, not lost
                    await self.request(stream, left, 0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _end(self, stream: Stream) -> None:
        if stream.ended or stream.future is None:
            return
        stream.paused = stream.closing = True
        await _half_close(stream)
        stream.future.cancel()
        try:
            await asyncio.to_thread(stream.future.result, CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("pubsub.stream_shutdown_timed_out", subscription=stream.path)
        except Exception:  # nothing to act on: a half-closed stream ends with a status the client reports
            pass

    async def request(
        self, stream: Stream, ack_ids: list[str] | Callable[[], list[str]], seconds: int | None
    ) -> None:
        """Ack (``seconds`` None) or change the deadline of messages of a stream that ended on its own,
        as unary requests of our own, one at a time so that a lease extension never overtakes (and
        undoes) a nack sent before it. ``ack_ids`` may be a callable, read once the requests before
        are sent."""
        async with self._requests:
            ids = ack_ids() if callable(ack_ids) else ack_ids
            for start in range(0, len(ids), 1000):
                await asyncio.to_thread(self._send, stream.path, ids[start : start + 1000], seconds)

    def _send(self, subscription: str, ack_ids: list[str], seconds: int | None) -> None:
        if seconds is None:
            self._client.acknowledge(subscription=subscription, ack_ids=ack_ids, timeout=30)
        else:
            self._client.modify_ack_deadline(
                subscription=subscription, ack_ids=ack_ids, ack_deadline_seconds=seconds, timeout=30
            )

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_leases(self, stream: Stream) -> None:
        """A stream that ended on its own took the client's leaser with it: extend the leases of its
        deliveries still running ourselves, until each is settled."""
        while stream.unsettled:
            try:
                await self.request(
                    stream, lambda: [d.received.ack_id for d in stream.unsettled], ORPHAN_LEASE_SECONDS
                )
            except Exception as exc:
                log.warning("pubsub.lease_extension_failed", error=repr(exc))
            await asyncio.sleep(ORPHAN_LEASE_INTERVAL)


def _handled_by_scheduler(received: Received) -> None:
    """Never called: :class:`Stream` hands messages to the event loop itself."""
    raise AssertionError("Stream does not call the message callback")


def _held(stream: Stream) -> dict[str, Any]:
    """What a paused stream holds: released to us but not handed over, and on hold in the client."""
    manager = stream.manager
    on_hold = getattr(getattr(manager, "_messages_on_hold", None), "size", 0)
    leaser = getattr(manager, "_leaser", None)
    consumer = getattr(manager, "_consumer", None)
    return {
        "held": len(stream._batch),
        "on_hold": on_hold if isinstance(on_hold, int) else 0,
        "leased": getattr(leaser, "message_count", None),
        "consumer_paused": getattr(consumer, "is_paused", None),
    }


def _never_pause(manager: Any) -> None:
    """Keep the client reading its stream when flow control is reached (the emulator only).

    The emulator ignores flow control and sends the whole backlog into the stream. A client that pauses
    its consumer at ``max_messages`` leaves the rest unread in the stream, where it cannot extend their
    leases: each lapses and is delivered again into the same stream, behind its stale copy, whose ack
    then does nothing. Under CPU load a second worker acked each of 3,200 messages five times, and
    200+ such copies were still in flight when it stopped (tests/pubsub/test_loss.py). Read at once,
    the excess goes on hold in the client, leased, and is released within flow control after each
    batch of acks (the client would release only when its consumer is paused). Pub/Sub itself honours
    flow control, so nothing changes there. Private API: nothing happens if the client's internals
    changed.
    """
    lock = getattr(manager, "_pause_resume_lock", None)
    release = getattr(manager, "_maybe_release_messages", None)
    if lock is None or release is None or not hasattr(manager, "maybe_resume_consumer"):
        return

    def release_held() -> None:  # the client calls it after each batch of acks and nacks
        with lock:
            if manager._consumer is not None:  # None once the client's shutdown began
                release()

    manager.maybe_pause_consumer = lambda: None
    manager.maybe_resume_consumer = release_held  # never paused, so releasing is all it has to do


async def _half_close(stream: Stream, timeout: float = 2.0) -> None:
    """End the stream from our side first and give the server ``timeout`` to finish it, before the
    client's shutdown cancels it.

    Needed for the emulator only (google-cloud-cli-pubsub-emulator 528, cloud-pubsub-emulator 0.8.20):
    the client's shutdown cancels the call (RST_STREAM), which the emulator fails on (``NoSuchMethodError``
    in ``onRstStreamRead`` in its log); it never forgets the cancelled stream and keeps assigning it
    messages until their ack deadline lapses. A half-close it handles: it completes the stream. Pub/Sub
    itself takes either. This reaches into the client's internals (the bidi RPC's request queue, where
    ``None`` ends the request stream); if they are not there, only the client's cancel is used.

    The end of the stream arrives only after the responses sent before it, so the client's consumer
    must keep reading them. The emulator ignores flow control, and with ``max_messages`` leased the
    client pauses its consumer: the end would never arrive and what the emulator sent into the stream
    would come back only when its ack deadline lapses (tests/ops/test_rolling_restart.py saw this). So
    the consumer is resumed until the stream ends; what it reads is put on hold, and the client's
    shutdown nacks it.
    """
    manager = stream.manager
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
                    await asyncio.wait_for(ended.wait(), 0.01)
