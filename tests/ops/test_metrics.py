"""Metrics semantics that dashboards and alerts rely on."""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from application.commands import Command
from application.dispatcher import Context, Dispatcher, bind
from application.factory import CommandFactory
from application.messages import TYPE_ATTR, Message, Outcome
from config.bootstrap import ops_ready, start_ops
from config.container import Container
from config.settings import load
from infra.incident_metrics import MAX_ACTIVE_SERVICES, OTHER_SERVICE, IncidentMetrics
from infra.metrics import MAX_COMMAND_TYPES, OTHER_COMMAND, Metrics
from tests.contract.broker_contract import eventually
from tests.ops.test_server import get
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


# --- issue 11: waiting vs in flight, settle failures, build and process metrics, no _created ---------


class SettleFails(FakeDelivery):
    """A delivery whose broker connection dropped before its outcome could be sent."""

    async def ack(self) -> None:
        self.settled.set()
        raise ConnectionError("connection lost before the ack")


async def worker_metrics(tmp_path: Path, dispatcher_test: Any) -> dict[str, Any]:
    """Start the worker's ops server the way `app.py worker` does (bootstrap.start_ops, ops_ready), run
    ``dispatcher_test(dispatcher)``, and return the unlabelled samples /metrics shows then (and
    incidentd_build_info's labels, as "build <label>")."""
    settings = load(sqlite_path=tmp_path / "incidentd.db", ops_host="127.0.0.1", ops_port=0, concurrency=1)
    container = Container(settings=settings)
    broker = SimpleNamespace(subscriber=SimpleNamespace(connected=True))
    try:
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        server = await start_ops(settings, container)
        assert server is not None
        await ops_ready(server, container, broker, dispatcher)
        try:
            await dispatcher_test(dispatcher)
            _, text = await get(f"http://127.0.0.1:{server.port}/metrics")
        finally:
            await server.stop()
    finally:
        await container.shutdown_resources()  # type: ignore[misc]
    families = list(text_string_to_metric_families(text))
    assert not [s.name for f in families for s in f.samples if s.name.endswith("_created")], "_created"
    samples = {s.name: s.value for f in families for s in f.samples if not s.labels}
    build = [s.labels for f in families for s in f.samples if s.name == "incidentd_build_info"]
    return samples | {f"build {key}": value for labels in build for key, value in labels.items()}


async def test_deliveries_waiting_for_a_slot_are_not_counted_as_in_flight(tmp_path: Path) -> None:
    """With one handler slot and three deliveries, /metrics shows one in flight and two waiting (before,
    incidentd_messages_in_flight said three while only one ran)."""
    release = asyncio.Event()
    deliveries = [FakeDelivery(Message(b'{"title": "db down"}', {TYPE_ATTR: "incident.create"}, f"m-{i}"))
                  for i in range(3)]  # fmt: skip

    async def three_deliveries(dispatcher: Dispatcher) -> None:
        original = dispatcher._handlers

        async def blocked(command: Command, context: Context) -> None:
            await release.wait()

        dispatcher._handlers = {command: [blocked] for command in original}
        for delivery in deliveries:
            dispatcher.submit(delivery)
        await eventually(lambda: dispatcher.waiting == 2)

    samples = await worker_metrics(tmp_path, three_deliveries)
    release.set()
    assert samples["incidentd_messages_in_flight"] == 1
    assert samples["incidentd_messages_waiting"] == 2


async def test_a_settle_the_broker_did_not_take_is_counted(tmp_path: Path) -> None:
    """An outcome lost with the broker connection shows in incidentd_settle_failures_total (it used to be
    only a log line, and the message in no counter at all)."""

    async def settle_fails(dispatcher: Dispatcher) -> None:
        delivery = SettleFails(Message(b'{"title": "db down"}', {TYPE_ATTR: "incident.create"}, "m-1"))
        dispatcher.submit(delivery)
        await eventually(lambda: dispatcher.settle_failures == 1)

    samples = await worker_metrics(tmp_path, settle_fails)
    assert samples["incidentd_settle_failures_total"] == 1


async def test_metrics_show_build_info_and_process_usage_and_no_created_series(tmp_path: Path) -> None:
    """/metrics names the running version and shows the process's memory and CPU; no counter or
    histogram exports a *_created series (checked by worker_metrics for every test here)."""

    async def nothing(dispatcher: Dispatcher) -> None:
        pass

    samples = await worker_metrics(tmp_path, nothing)
    assert samples["process_resident_memory_bytes"] > 10_000_000
    assert samples["process_cpu_seconds_total"] > 0
    registry = Metrics().registry
    info = {
        s.labels["version"] for f in registry.collect() for s in f.samples if s.name.endswith("build_info")
    }
    assert info == {version("incidentd")}


async def test_active_incidents_name_at_most_the_busiest_services() -> None:
    """A flood of distinct service labels cannot grow incidentd_incidents_active without bound: the 50
    services with most unresolved incidents keep their name, the rest are summed as "other", and the
    total is unchanged."""

    class Store:
        async def count_active(self) -> dict[tuple[str, str], int]:
            busy = {("critical", f"busy-{i}"): 10 for i in range(MAX_ACTIVE_SERVICES)}
            return busy | {("high", f"quiet-{i}"): 1 for i in range(500)} | {("critical", "quiet-0"): 2}

    registry = CollectorRegistry()
    metrics = IncidentMetrics(registry)
    await metrics.refresh(Store())  # type: ignore[arg-type]
    samples = {
        (s.labels["severity"], s.labels["service"]): s.value
        for f in registry.collect()
        for s in f.samples
        if s.name == "incidentd_incidents_active"
    }
    assert len({service for _, service in samples}) == MAX_ACTIVE_SERVICES + 1
    assert samples[("critical", "busy-7")] == 10
    assert (samples[("high", OTHER_SERVICE)], samples[("critical", OTHER_SERVICE)]) == (500, 2)
    assert sum(samples.values()) == MAX_ACTIVE_SERVICES * 10 + 502
