"""The Pub/Sub subscriber on the emulator: leases of running handlers outlive their stream."""

from __future__ import annotations

import asyncio
import time

from application.messages import Delivery, Outcome
from application.settle import settle
from config.settings import Settings
from infra.pubsub import open_broker
from tests.contract.broker_contract import eventually, publish_records


async def test_a_stream_that_ends_on_its_own_keeps_the_leases_of_running_handlers(
    settings: Settings,
) -> None:
    """The streaming pull ends without a stop (a permanent error; the subscriber resubscribes after
    5 s) while a handler runs longer than the ack deadline: its lease is still extended, so the message
    is not delivered a second time while it runs, and its ack goes out afterwards. (No lease keeper
    started for such a stream: the message came back to the new stream while its first run went on.)"""
    deliveries: list[Delivery] = []
    async with open_broker(settings) as broker:
        await broker.setup()
        subscriber = broker.subscriber
        await publish_records(broker, ["long"])
        await subscriber.start(deliveries.append)
        await eventually(lambda: len(deliveries) == 1)
        future = subscriber._streams[broker.topology.subscription_path].future
        assert future is not None
        future.cancel()  # the stream ends under the subscriber, not through stop()
        held_until = time.monotonic() + settings.pubsub_ack_deadline + 6
        while time.monotonic() < held_until:
            assert len(deliveries) == 1, "delivered again while its first run was still going"
            await asyncio.sleep(0.2)
        await settle(deliveries[0], Outcome.ack())
        await asyncio.sleep(settings.pubsub_ack_deadline + 2)
        assert len(deliveries) == 1, "the ack after the stream ended was lost"
        await subscriber.stop()
        await subscriber.close()
