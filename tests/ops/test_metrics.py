"""Metrics semantics that dashboards and alerts rely on."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from application.messages import Message, Outcome
from infra.metrics import MAX_COMMAND_TYPES, OTHER_COMMAND, Metrics


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
