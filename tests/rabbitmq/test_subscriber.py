"""Coalesced acks on the real RabbitMQ: correct and never stalling with out-of-order completion."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from aio_pika.exceptions import ChannelInvalidStateError

from application.dispatcher import Context, Dispatcher, RetryPolicy, bind
from application.factory import CommandFactory
from application.messages import Delivery, Outcome
from application.settle import settle
from config.settings import Settings
from infra.rabbitmq import open_broker
from tests.contract.broker_contract import Record, eventually, publish_records, running
from tests.proxy import TcpProxy
from tests.rabbitmq.conftest import queue_depth


async def test_a_slow_message_does_not_hold_back_the_acks_of_later_ones(settings: Settings) -> None:
    """With prefetch 4, one slow handler at the head of the channel: the 39 messages behind it are
    still handled and acked (one by one) while it runs, so the prefetch window never closes; when it
    finishes, everything is acked exactly once (a wrong multiple-ack would close the channel and bring
    messages back as duplicates)."""
    effects: Counter[str] = Counter()
    release, slow_started = asyncio.Event(), asyncio.Event()

    async def handle(cmd: Record, ctx: Context) -> None:
        if cmd.key == "slow":
            slow_started.set()
            await release.wait()
        effects[cmd.key] += 1

    dispatcher = Dispatcher(
        CommandFactory([Record]), bind({Record: [handle]}, {}), concurrency=4, timeout=30,
        retry=RetryPolicy(in_process_attempts=1),
    )  # fmt: skip
    keys = ["slow", *(f"k{i}" for i in range(39))]
    async with open_broker(settings, prefetch=4) as broker:
        await broker.setup()
        await publish_records(broker, keys[:1])
        async with running(broker, dispatcher) as stop:
            await slow_started.wait()
            await publish_records(broker, keys[1:])  # one by one: each finishes on its own
            await eventually(lambda: len(effects) == 39, timeout=20)
            assert "slow" not in effects
            release.set()
            await eventually(lambda: effects["slow"] == 1)
            await asyncio.sleep(0.3)  # room for a wrongful redelivery
            await stop()
        assert effects == Counter(keys)
        assert await queue_depth([broker.topology.queue]) == 0


async def test_a_retry_after_the_channel_died_publishes_no_copy(settings: Settings) -> None:
    """The consumer channel dies while a handler runs (RabbitMQ requeues the unacked original at once).
    The RETRY that follows must not also publish a retry copy - that would make two live copies of one
    message - and fails the settle instead (the dispatcher logs it; the original comes back)."""
    deliveries: list[Delivery] = []
    async with open_broker(settings, prefetch=4) as broker:
        await broker.setup()
        await publish_records(broker, ["k"])
        await broker.subscriber.start(deliveries.append)
        await eventually(lambda: len(deliveries) == 1)
        assert broker.subscriber._channel is not None
        await broker.subscriber._channel.close()  # what a lost connection does to the delivery's channel
        with pytest.raises(ChannelInvalidStateError):
            await settle(deliveries[0], Outcome.retry(0.2, "still down"))
        await broker.subscriber.stop()
        await broker.subscriber.close()
        await asyncio.sleep(0.6)  # past the retry delay: a copy would be back in the main queue
        topology = broker.topology
        assert await queue_depth([topology.queue, *topology.retry_queues]) == 1


async def test_a_copy_the_broker_never_confirms_hands_the_original_back_in_time(settings: Settings) -> None:
    """A blocked broker (a memory or disk alarm) never confirms the retry copy. The settle gives up after
    the confirm timeout, so a shutdown drain is not held until the kubelet's SIGKILL; the original was
    never acked, comes back, and is handled; no copy is left behind and nothing is lost."""
    deliveries: list[Delivery] = []
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        through_proxy = settings.model_copy(
            update={"rabbitmq_url": proxy.url(settings.rabbitmq_url) + "?reconnect_interval=0.5"}
        )
        async with open_broker(through_proxy, prefetch=4, confirm_timeout=0.5) as broker:
            await broker.setup()
            await publish_records(broker, ["k"])
            await broker.subscriber.start(deliveries.append)
            await eventually(lambda: len(deliveries) == 1)
            proxy.delay = 3600  # from now on nothing gets through, and the connection stays open
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await settle(deliveries[0], Outcome.retry(0.2, "downstream is down"))
            assert time.monotonic() - started < 5
            proxy.delay = 0
            proxy.drop()  # the stalled connection goes; what it held back never reaches RabbitMQ
            await eventually(lambda: len(deliveries) == 2, timeout=30)
            assert deliveries[1].message.body == deliveries[0].message.body
            await settle(deliveries[1], Outcome.ack())
            await broker.subscriber.stop()
            await broker.subscriber.close()
            topology = broker.topology
    assert await queue_depth([topology.queue, *topology.retry_queues, topology.dlq]) == 0


async def test_acks_sent_just_before_close_are_not_lost(settings: Settings) -> None:
    """Four times: 256 deliveries acked, then the subscriber closed at once (what SIGTERM does after
    the drain): every ack reaches the queue, so nothing comes back to the next worker. A quorum queue
    dropped acks still in flight when their channel closed (rabbitmq-server#10327: 67-130 of 256 in 2
    of 6 trials under load); the close now makes one synchronous round trip after the last ack."""
    for trial in range(4):
        deliveries: list[Delivery] = []
        async with open_broker(settings, prefetch=256) as broker:
            await broker.setup()
            await publish_records(broker, [f"t{trial}-{i}" for i in range(256)])
            await broker.subscriber.start(deliveries.append)
            await eventually(lambda d=deliveries: len(d) == 256)  # type: ignore[misc]
            await broker.subscriber.stop()
            for delivery in deliveries:
                await settle(delivery, Outcome.ack())
            await broker.subscriber.close()
            topology = broker.topology
        assert await queue_depth([topology.queue]) == 0, f"trial {trial}: acks lost at close"
