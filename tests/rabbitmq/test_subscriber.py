"""Coalesced acks on the real RabbitMQ: correct and never stalling with out-of-order completion."""

from __future__ import annotations

import asyncio
from collections import Counter

from application.dispatcher import Context, Dispatcher, RetryPolicy, bind
from application.factory import CommandFactory
from config.settings import Settings
from infra.rabbitmq import open_broker
from tests.contract.broker_contract import Record, eventually, publish_records, running
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
