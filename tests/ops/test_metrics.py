"""Metrics semantics that dashboards and alerts rely on."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from application.commands import Command
from application.dispatcher import Context, Dispatcher, bind
from application.factory import CommandFactory
from application.messages import TYPE_ATTR, Message, Outcome
from config.container import Container
from config.settings import load
from infra.metrics import MAX_COMMAND_TYPES, OTHER_COMMAND, Metrics
from tests.unit.test_dispatcher import FakeDelivery


def count(registry: CollectorRegistry, command_type: str, outcome: str) -> float | None:
    labels = {"command_type": command_type, "outcome": outcome}
    return registry.get_sample_value("incidentd_messages_total", labels)


def test_registered_command_types_exist_at_zero_before_any_message() -> None:
    """rate() sees the first message of a type, because every series is exported at 0 from the start."""
    metrics = Metrics(command_types=["incident.create"])
    for outcome in ("ack", "retry", "dead_letter"):
        assert count(metrics.registry, "incident.create", outcome) == 0
        assert count(metrics.registry, "unknown", outcome) == 0


def test_each_metrics_instance_has_its_own_registry() -> None:
    """Two workers (or two tests) in one process do not add to each other's counts."""
    first, second = Metrics(), Metrics()
    first.observe(Message(body=b"x"), "unknown", Outcome.dead_letter("bad"), 0.0)
    assert count(first.registry, "unknown", "dead_letter") == 1
    assert count(second.registry, "unknown", "dead_letter") == 0


def test_a_flood_of_distinct_command_types_is_capped() -> None:
    """A bug that labels by free text cannot grow the series without bound: the excess counts as other."""
    metrics = Metrics()
    for i in range(MAX_COMMAND_TYPES + 50):
        metrics.observe(Message(body=b"x"), f"type-{i}", Outcome.ack(), 0.0)
    families = {
        s.labels["command_type"]
        for f in metrics.registry.collect()
        for s in f.samples
        if "command_type" in s.labels
    }
    assert len(families) == MAX_COMMAND_TYPES + 1
    # "unknown" is bound up front and takes one of the slots
    overflow = MAX_COMMAND_TYPES + 50 - (MAX_COMMAND_TYPES - 1)
    assert count(metrics.registry, OTHER_COMMAND, "ack") == overflow


async def test_received_counts_a_message_as_it_starts_and_outcomes_as_they_settle() -> None:
    """A message whose handler still runs is already counted as received (by its command type) but has
    no outcome yet; an undecodable one is received as "unknown"; settled, each has one outcome."""
    release = asyncio.Event()

    async def handle(command: Slow, context: Context) -> None:
        await release.wait()

    metrics = Metrics(command_types=[Slow.TYPE])
    dispatcher = Dispatcher(
        CommandFactory([Slow]), bind({Slow: [handle]}, {}), concurrency=2, timeout=10,
        observers=[metrics.observe], receivers=[metrics.received],
    )  # fmt: skip
    dispatcher.submit(FakeDelivery(Message(body=b"{}", attributes={TYPE_ATTR: Slow.TYPE})))
    dispatcher.submit(FakeDelivery(Message(body=b"not json")))
    await asyncio.sleep(0.05)

    def received(command_type: str) -> float | None:
        return metrics.registry.get_sample_value(
            "incidentd_messages_received_total", {"command_type": command_type}
        )

    assert (received(Slow.TYPE), count(metrics.registry, Slow.TYPE, "ack")) == (1, 0)
    assert (received("unknown"), count(metrics.registry, "unknown", "dead_letter")) == (1, 1)
    release.set()
    await dispatcher.drain(5)
    assert (received(Slow.TYPE), count(metrics.registry, Slow.TYPE, "ack")) == (1, 1)


class Slow(Command):
    TYPE = "test.slow"


async def test_the_worker_container_counts_received_and_outcomes(tmp_path: Path) -> None:
    """The container wires the worker's dispatcher to its metrics: one incident.create through it is
    received once and acked once."""
    container = Container(settings=load(sqlite_path=tmp_path / "incidentd.db"))
    try:
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        delivery = FakeDelivery(Message(b'{"title": "db down"}', {TYPE_ATTR: "incident.create"}, "m-1"))
        dispatcher.submit(delivery)
        await asyncio.wait_for(delivery.settled.wait(), 10)
        registry = container.metrics().registry
    finally:
        await container.shutdown_resources()  # type: ignore[misc]
    labels = {"command_type": "incident.create"}
    assert registry.get_sample_value("incidentd_messages_received_total", labels) == 1
    assert count(registry, "incident.create", "ack") == 1
