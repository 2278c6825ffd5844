"""A message with two live copies on a real RabbitMQ queue is applied once and announced once.

Two live copies happen when a RETRY's copy is confirmed too late: the copy-confirm timeout hands the
original back (nack, requeue), and the copy lands anyway. The test makes that happen for real: the copy
is published and confirmed by RabbitMQ, then the publish reports a timeout, as a confirm that came after
the timeout would. Both the requeued original and the copy (same message id, attempt 2) are then
delivered to the worker. The built-in handlers run on a real SQLite store with a Slack stand-in.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

import pytest
from structlog.testing import capture_logs

from application.actions import ActionRules
from application.analysis import after_commit_steps
from application.dispatcher import Dispatcher, RetryPolicy, bind, bind_all
from application.errors import TransientError
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident, IncidentPolicy, TimelineEntry
from application.messages import TYPE_ATTR, Disposition, Outcome
from application.settle import DUPLICATE, SettledRecord
from config.settings import Settings
from infra.rabbitmq import open_broker
from infra.rabbitmq.subscriber import RabbitDelivery, RabbitSubscriber
from infra.rabbitmq.topology import Topology
from infra.sqlite.store import SqliteStore
from tests.contract.broker_contract import eventually, running
from tests.incidents.conftest import payload
from tests.rabbitmq.conftest import queue_depth


class Slack:
    """The notifier: records what it sends; its first ``failures`` calls fail with a TransientError."""

    def __init__(self, failures: int) -> None:
        self.sent: list[tuple[str, str]] = []
        self.failures = failures

    async def notify(self, incident: Incident, entry: TimelineEntry) -> None:
        if self.failures:
            self.failures -= 1
            raise TransientError("Slack answered 503")
        self.sent.append((incident.dedup_key, entry.kind))


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(":memory:")
    yield store
    await store.close()


def worker_dispatcher(
    store: SqliteStore, slack: Slack, settled: SettledRecord | None, settles: list[tuple[int, Outcome]]
) -> Dispatcher:
    """The built-in handlers as the container binds them, one attempt in process (a failure -> RETRY);
    ``settles`` gets (attempt, outcome) per settled delivery."""
    policy = IncidentPolicy()
    dependencies = {
        "store": store, "policy": policy, "actions": ActionRules([], cluster=None, policy=policy),
        "cluster": None, "cloud": None, "issue_tracker": None, "notifier": slack, "analysis": None,
    }  # fmt: skip
    return Dispatcher(
        CommandFactory(HANDLERS),
        bind(HANDLERS, dependencies),
        after_commit=bind_all(after_commit_steps(False), dependencies),
        concurrency=4,
        timeout=10,
        retry=RetryPolicy(max_attempts=5, backoff=(1.0, 1.0), in_process_attempts=1),
        observers=[lambda message, _, outcome, __: settles.append((message.attempt, outcome))],
        settled=settled,
    )


def confirm_late_once(subscriber: RabbitSubscriber) -> list[str]:
    """The next copy is published and confirmed, then its publish reports a timeout (a late confirm).
    Returns the ids of the copies that landed that way."""
    real = subscriber.publish_copy
    landed: list[str] = []

    async def late(delivery: RabbitDelivery, attributes: Mapping[str, str], outcome: Outcome) -> None:
        await real(delivery, attributes, outcome)
        if landed:
            return
        landed.append(delivery.message.message_id)
        raise TimeoutError("the copy's confirm came after the confirm timeout")

    subscriber.publish_copy = late  # type: ignore[method-assign]
    return landed


async def test_a_late_confirmed_retry_copy_is_not_applied_or_announced_twice(
    settings: Settings, store: SqliteStore
) -> None:
    """Slack fails once: the message's RETRY copy is confirmed late, so RabbitMQ holds both the requeued
    original and the copy (one message id). The original is handled and acked; the copy is then acked
    without running the handlers (one ``message.duplicate_dropped`` line): two incidents opened once,
    each announced once, nothing left in the queues."""
    slack = Slack(failures=1)
    async with open_broker(settings) as broker:
        await broker.setup()
        landed = confirm_late_once(broker.subscriber)
        settles: list[tuple[int, Outcome]] = []
        dispatcher = worker_dispatcher(store, slack, SettledRecord(store), settles)
        body = json.dumps(payload("alertmanager_firing")).encode()
        with capture_logs() as logs:
            async with running(broker, dispatcher):
                message_id = await broker.publisher.publish(body, {TYPE_ATTR: "alertmanager.webhook"})
                await eventually(lambda: sum(o.disposition is Disposition.ACK for _, o in settles) >= 2)
                topology = Topology.from_settings(settings)
                await eventually(lambda: _empty(topology), timeout=20)

    assert landed == [message_id], "no copy was confirmed late: the scenario did not happen"
    incidents = await store.list()
    assert len(incidents) == 2
    assert sorted(slack.sent) == sorted((i.dedup_key, "opened") for i in incidents)
    # The first delivery's RETRY did not settle (its copy "timed out", the original was handed back).
    assert dispatcher.settle_failures == 1
    assert [(attempt, o.disposition) for attempt, o in settles] == [
        (1, Disposition.ACK),  # the original again: a no-op in the store, announced
        (2, Disposition.ACK),  # the copy: dropped
    ]
    assert settles[-1][1] is DUPLICATE
    assert sum(1 for e in logs if e["event"] == "message.duplicate_dropped") == 1


async def _empty(topology: Topology) -> bool:
    return await queue_depth([topology.queue, *topology.retry_queues]) == 0
