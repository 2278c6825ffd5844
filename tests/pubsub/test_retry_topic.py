"""Retry copies stay among incidentd's own topic and subscription: the main topic's other subscribers
see each original once."""

from __future__ import annotations

import asyncio
from collections import Counter

from application.messages import ATTEMPT_ATTR
from config.settings import Settings
from infra.pubsub import open_broker
from infra.pubsub.message import MESSAGE_ID_ATTR
from tests.contract.broker_contract import (
    MAX_ATTEMPTS,
    Ledger,
    eventually,
    make_dispatcher,
    publish_records,
    running,
)
from tests.pubsub.conftest import backlog
from tests.pubsub.test_dead_letters import pull_raw


def _create_audit_feed(topic_path: str, subscription_path: str) -> None:
    from google.cloud import pubsub_v1

    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.create_subscription(name=subscription_path, topic=topic_path)


def _delete(subscription_path: str) -> None:
    from google.cloud import pubsub_v1

    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.delete_subscription(subscription=subscription_path)


async def test_an_audit_feed_on_the_topic_sees_each_original_once_and_no_retry_copy(
    settings: Settings,
) -> None:
    """A second subscription on the main topic (an audit feed) receives each of 10 published messages
    exactly once, although every one of them failed twice and was retried twice by incidentd (two retry
    copies each, handled on the third attempt): the copies went to incidentd's own retry topic. (They
    used to go back to the main topic: the feed got 30 messages, 20 of them copies.)"""
    ledger = Ledger()
    keys = [f"audit{i}" for i in range(10)]
    ledger.fail_until = dict.fromkeys(keys, MAX_ATTEMPTS)  # attempts 1 and 2 fail, 3 succeeds
    feed = f"{settings.pubsub_subscription}-audit-feed"
    async with open_broker(settings) as broker:
        await broker.setup()
        feed_path = f"projects/{settings.pubsub_project}/subscriptions/{feed}"
        await asyncio.to_thread(_create_audit_feed, broker.topology.topic_path, feed_path)
        try:
            await publish_records(broker, keys)
            async with running(broker, make_dispatcher(ledger)) as stop:
                await eventually(lambda: sum(ledger.effects.values()) == len(keys), timeout=60)
                await stop()
            assert ledger.effects == Counter(dict.fromkeys(keys, 1))
            assert sorted(a for _, a in ledger.calls) == [1] * 10 + [2] * 10 + [3] * 10
            assert await backlog(broker.topology) == 0
            seen: list[tuple[bytes, dict[str, str], str]] = []
            while batch := await pull_raw(feed_path):
                seen += batch
        finally:
            await asyncio.to_thread(_delete, feed_path)
    assert len(seen) == len(keys)
    assert len({attributes[MESSAGE_ID_ATTR] for _, attributes, _ in seen}) == len(keys)
    assert not [attributes for _, attributes, _ in seen if ATTEMPT_ATTR in attributes]
