"""The topics and subscriptions incidentd uses on Pub/Sub, created idempotently.

::

    publishers ---> topic <T> ---> subscription <S> ----------+   (ack deadline, retry policy,
                    (and any other subscription:              |    dead_letter_policy -> <T>.dlq
                     an audit feed sees each original once)   v    as a backstop, on <S> and <S>.retry)
                                                            worker
    topic <T>.retry ---> subscription <S>.retry ------------> |  --RETRY (delay > 0): copy, attempt + 1,
         ^                                                    |    not-before, to <T>.retry
         +----------------------------------------------------+
                                                              | DEAD_LETTER: copy with reason / error /
                                                              v   attempts / first-seen
                                topic <T>.dlq ---> subscription <S>.dlq (no consumer; `dlq list|replay|purge`)

Pub/Sub has no delayed delivery, so a RETRY's copy is published at once with a not-before time; a
worker that receives it early parks it by setting its ack deadline to the time left (see
``infra/pubsub/subscriber.py``). The copies go to a retry topic of incidentd's own, read by its own
subscription, so the main topic's other subscriptions (an audit feed, another consumer) never see
them. (A subscription filter would not do: a filter on <S> cannot hide copies on <T> from the other
subscriptions, which are not incidentd's.) The dead-letter subscription is created first, and each
topic's subscription before anything is published to it: Pub/Sub drops what is published to a topic
without subscriptions, so neither a copy nor the native backstop may ever go into the void.

Creating what exists is a no-op; an existing subscription is left as it is (its settings are not
changed: edit them with ``gcloud pubsub subscriptions update``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient
    from google.cloud.pubsub_v1.types import FlowControl

    from config.settings import Settings

log = structlog.get_logger("incidentd.pubsub")

# Pub/Sub's longest ack deadline (and so the longest a RETRY's copy can be parked at a time).
MAX_ACK_DEADLINE = 600
# The dead-letter subscription: a listing holds its messages for this long before they show again.
DLQ_ACK_DEADLINE = 60
DLQ_RETENTION_SECONDS = 7 * 24 * 3600  # Pub/Sub's maximum


@dataclass(frozen=True)
class Topology:
    project: str
    topic: str
    subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str
    ack_deadline: int = 60
    max_delivery_attempts: int = 20  # native dead_letter_policy; 0: none
    retry_min_backoff: float = 1.0  # 0 and 0: no retry policy
    retry_max_backoff: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            project=settings.pubsub_project,
            topic=settings.pubsub_topic,
            subscription=settings.pubsub_subscription,
            dead_letter_topic=settings.pubsub_dead_letter_topic or f"{settings.pubsub_topic}.dlq",
            dead_letter_subscription=(
                settings.pubsub_dead_letter_subscription or f"{settings.pubsub_subscription}.dlq"
            ),
            ack_deadline=settings.pubsub_ack_deadline,
            max_delivery_attempts=settings.pubsub_max_delivery_attempts,
            retry_min_backoff=settings.pubsub_retry_min_backoff,
            retry_max_backoff=max(settings.pubsub_retry_min_backoff, settings.pubsub_retry_max_backoff),
        )

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def retry_topic_path(self) -> str:
        """Where RETRY copies go: ``<topic>.retry``."""
        return f"{self.topic_path}.retry"

    @property
    def retry_subscription_path(self) -> str:
        """incidentd's subscription on the retry topic: ``<subscription>.retry``."""
        return f"{self.subscription_path}.retry"

    @property
    def dead_letter_topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.dead_letter_topic}"

    @property
    def dead_letter_subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.dead_letter_subscription}"

    def subscription_request(self, retry: bool = False) -> dict[str, Any]:
        """The main subscription, or (``retry``) the retry one: the same settings on both."""
        request: dict[str, Any] = {
            "name": self.retry_subscription_path if retry else self.subscription_path,
            "topic": self.retry_topic_path if retry else self.topic_path,
            "ack_deadline_seconds": self.ack_deadline,
        }
        if self.retry_max_backoff > 0:
            request["retry_policy"] = {
                "minimum_backoff": {"seconds": math.ceil(self.retry_min_backoff)},
                "maximum_backoff": {"seconds": math.ceil(self.retry_max_backoff)},
            }
        if self.max_delivery_attempts:
            request["dead_letter_policy"] = {
                "dead_letter_topic": self.dead_letter_topic_path,
                "max_delivery_attempts": self.max_delivery_attempts,
            }
        return request


def create(publisher: PublisherClient, subscriber: SubscriberClient, topology: Topology) -> None:
    """Create the three topics and their subscriptions where they do not exist (blocking: run in a
    thread)."""
    from google.api_core.exceptions import AlreadyExists

    def ensure(kind: str, call: Any, request: dict[str, Any]) -> None:
        try:
            call(request=request)
            log.info("pubsub.created", kind=kind, name=request["name"])
        except AlreadyExists:
            pass

    ensure("topic", publisher.create_topic, {"name": topology.topic_path})
    ensure("topic", publisher.create_topic, {"name": topology.dead_letter_topic_path})
    ensure("subscription", subscriber.create_subscription, {
        "name": topology.dead_letter_subscription_path,
        "topic": topology.dead_letter_topic_path,
        "ack_deadline_seconds": DLQ_ACK_DEADLINE,
        "message_retention_duration": {"seconds": DLQ_RETENTION_SECONDS},
    })  # fmt: skip
    ensure("topic", publisher.create_topic, {"name": topology.retry_topic_path})
    ensure("subscription", subscriber.create_subscription, topology.subscription_request(retry=True))
    ensure("subscription", subscriber.create_subscription, topology.subscription_request())


def lease_limit(settings: Settings) -> float:
    """How long the client keeps extending a message's lease: a wait for a handler slot plus the
    longest command timeout (in-process retries included), twice over, plus room to settle."""
    longest = max([settings.command_timeout, *settings.command_timeouts.values()])
    return 2 * longest + 60


def flow_control(settings: Settings) -> FlowControl:
    """Two outstanding messages per handler slot (like RabbitMQ's prefetch)."""
    from google.cloud.pubsub_v1.types import FlowControl

    return FlowControl(
        max_messages=2 * settings.concurrency,
        max_bytes=settings.pubsub_max_outstanding_bytes,
        max_lease_duration=lease_limit(settings),
        max_duration_per_lease_extension=settings.pubsub_max_lease_extension,
    )
