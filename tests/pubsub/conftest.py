"""Fixtures for tests against the Pub/Sub emulator (started once per session on a free port by
tests/standins/pubsub.py): unique topics and subscriptions per test, deleted after."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from config.settings import Settings, load
from infra.pubsub.topology import Topology

PROJECT = "incidentd-test"


def pubsub_settings(**overrides: object) -> Settings:
    """Settings for a test of its own: topic and subscriptions named with a random suffix. No retry
    policy by default, so a nack is redelivered (and counted by ``waiting``) at once."""
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, object] = {
        "broker": "pubsub",
        "pubsub_project": PROJECT,
        "pubsub_topic": f"incidentd-test-{suffix}",
        "pubsub_subscription": f"incidentd-test-{suffix}",
        "pubsub_retry_min_backoff": 0,
        "pubsub_retry_max_backoff": 0,
        # Short leases: what a stopped or killed worker held comes back within ~10 s (the emulator also
        # keeps assigning messages to a stream it failed to close: docs/pubsub.md, "Emulator").
        "pubsub_max_lease_extension": 10,
        "pubsub_ack_deadline": 10,
    }
    return load(**(values | overrides))


def _delete(topology: Topology) -> None:
    from google.api_core.exceptions import NotFound
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    with subscriber:
        for name in (
            topology.subscription_path,
            topology.retry_subscription_path,
            topology.dead_letter_subscription_path,
        ):
            with contextlib.suppress(NotFound):
                subscriber.delete_subscription(subscription=name)
        for name in (topology.topic_path, topology.retry_topic_path, topology.dead_letter_topic_path):
            with contextlib.suppress(NotFound):
                publisher.delete_topic(topic=name)


async def delete_topology(topology: Topology) -> None:
    await asyncio.to_thread(_delete, topology)


def _deliverable(subscription_path: str) -> dict[str, bytes]:
    """Messages deliverable now on a subscription, by message id: pulled (twice) and nacked back."""
    from google.cloud import pubsub_v1

    with pubsub_v1.SubscriberClient() as subscriber:
        ack_ids: list[str] = []
        found: dict[str, bytes] = {}
        for _ in range(2):
            response = subscriber.pull(
                subscription=subscription_path, max_messages=1000, return_immediately=True, timeout=10
            )
            for received in response.received_messages:
                ack_ids.append(received.ack_id)
                found[received.message.message_id] = received.message.data
        if ack_ids:
            subscriber.modify_ack_deadline(
                subscription=subscription_path, ack_ids=ack_ids, ack_deadline_seconds=0
            )
        return found


async def waiting(*subscription_paths: str) -> int:
    """Messages deliverable now on these subscriptions (pulled and nacked back)."""
    return sum([len(await asyncio.to_thread(_deliverable, path)) for path in subscription_paths])


async def backlog(topology: Topology) -> int:
    """Messages deliverable now on incidentd's subscriptions: the main one and the retry one."""
    return await waiting(topology.subscription_path, topology.retry_subscription_path)


async def deliverable(subscription_path: str) -> dict[str, bytes]:
    return await asyncio.to_thread(_deliverable, subscription_path)


@pytest.fixture
async def settings(pubsub_emulator: str) -> AsyncIterator[Settings]:
    """Settings naming a fresh topology (not yet created); it is deleted after the test."""
    settings = pubsub_settings(retry_backoff=[0.2, 0.4])
    yield settings
    await delete_topology(Topology.from_settings(settings))
