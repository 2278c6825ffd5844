"""The Pub/Sub clients and the subscriber, publisher and dead-letter queue over them."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import structlog

from infra.pubsub.dlq import PubSubDeadLetters
from infra.pubsub.publisher import PubSubPublisher
from infra.pubsub.subscriber import PubSubSubscriber
from infra.pubsub.topology import Topology, create, flow_control

if TYPE_CHECKING:
    from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient
    from google.cloud.pubsub_v1.types import FlowControl

    from config.settings import Settings

log = structlog.get_logger("incidentd.pubsub")


class PubSubBroker:
    def __init__(
        self,
        publisher_client: PublisherClient,
        subscriber_client: SubscriberClient,
        topology: Topology,
        flow: FlowControl,
        *,
        publish_timeout: float = 30.0,
    ) -> None:
        self.topology = topology
        self._publisher_client = publisher_client
        self._subscriber_client = subscriber_client
        self.publisher = PubSubPublisher(publisher_client, topology.topic_path, timeout=publish_timeout)
        self.subscriber = PubSubSubscriber(
            subscriber_client,
            topology,
            self.publisher,
            flow,
            keep_reading=bool(os.environ.get("PUBSUB_EMULATOR_HOST")),
        )
        self.dead_letters = PubSubDeadLetters(subscriber_client, topology, self.publisher)

    async def ping(self, timeout: float = 10.0) -> None:
        """One call with a deadline and no client-side retry, so that an unreachable endpoint (or a
        wrong emulator host) is an error within ``timeout`` rather than the client's minute of silent
        retrying. A topic that does not exist yet, and a denied ``GetTopic`` (a worker's least-privilege
        roles, subscriber + publisher, do not grant it), still prove the endpoint and the credentials."""
        from google.api_core.exceptions import NotFound, PermissionDenied

        def get_topic() -> None:
            with contextlib.suppress(NotFound, PermissionDenied):
                self._publisher_client.get_topic(
                    request={"topic": self.topology.topic_path}, timeout=timeout, retry=None
                )

        await asyncio.to_thread(get_topic)

    async def setup(self) -> None:
        """Create both topics and both subscriptions where missing (idempotent)."""
        await asyncio.to_thread(create, self._publisher_client, self._subscriber_client, self.topology)
        log.info("pubsub.topology_ready", topic=self.topology.topic_path,
                 subscription=self.topology.subscription_path,
                 dead_letter_subscription=self.topology.dead_letter_subscription_path)  # fmt: skip


@contextlib.asynccontextmanager
async def open_broker(settings: Settings) -> AsyncIterator[PubSubBroker]:
    """Create the clients (they honour ``PUBSUB_EMULATOR_HOST``) and yield the broker. On exit the
    subscriber is closed first (its stream's last acks flushed), then the publisher's batches are sent,
    then the channels are closed."""
    from google.cloud import pubsub_v1

    publisher_client = pubsub_v1.PublisherClient()
    subscriber_client = pubsub_v1.SubscriberClient(**emulator_transport())
    broker = PubSubBroker(
        publisher_client, subscriber_client, Topology.from_settings(settings), flow_control(settings),
        publish_timeout=settings.pubsub_publish_timeout,
    )  # fmt: skip
    try:
        yield broker
    finally:
        await broker.subscriber.close()  # idempotent; a no-op after the worker closed it
        await asyncio.to_thread(publisher_client.stop)
        await asyncio.to_thread(subscriber_client.close)


def emulator_transport() -> dict[str, object]:
    """Under ``PUBSUB_EMULATOR_HOST``: a subscriber transport whose channel takes messages of any size.

    For the emulator the client library opens a plain ``grpc.insecure_channel`` with gRPC's default
    4 MiB receive limit (its channel to Google has none): a message over 4 MiB (Pub/Sub takes 10 MB) made
    every streaming pull response carrying it fail with RESOURCE_EXHAUSTED, silently retried, so it and
    the up to 100 messages sharing its response were never delivered. Empty without the emulator.
    """
    import os

    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return {}
    import grpc
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(host, options=unlimited)
    return {"transport": SubscriberGrpcTransport(host=host, channel=channel)}
