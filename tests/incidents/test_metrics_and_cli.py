"""Incident metrics as Prometheus would scrape them, and the ``incidents`` CLI."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from app import cli
from application.dispatcher import bind
from application.handlers import HANDLERS
from infra.incident_metrics import register_incident_metrics
from infra.sqlite.store import SqliteStore
from tests.incidents.conftest import alertmanager, context, oec

EXAMPLES = Path(__file__).parent.parent.parent / "examples" / "events.jsonl"


async def test_metrics_count_transitions_once_and_read_active_from_the_store(
    tmp_path: Path, deps: dict[str, Any]
) -> None:
    """Opening, acknowledging and resolving feed the counters and the time-to-acknowledge/resolve
    histograms once (a redelivery adds nothing); the active gauge shows what the store holds."""
    registry = CollectorRegistry()
    metrics = register_incident_metrics(registry)
    store = await SqliteStore.open(tmp_path / "m.db", metrics)
    handlers = bind(HANDLERS, {"store": store, **deps})
    try:
        create, ack = oec("oec_create"), oec("oec_acknowledge")
        await handlers[type(create)][0](create, context("m1"))
        await handlers[type(ack)][0](ack, context("m2"))
        await handlers[type(ack)][0](ack, context("m2"))  # redelivered
        webhook = alertmanager()
        await handlers[type(webhook)][0](webhook, context("m3"))
        resolved = alertmanager("alertmanager_resolved")
        await handlers[type(resolved)][0](resolved, context("m4"))
        await metrics.refresh(store)
    finally:
        await store.close()
    value = registry.get_sample_value
    assert value("incidentd_incidents_opened_total", {"source": "alertmanager", "severity": "critical"}) == 2
    assert value("incidentd_incident_time_to_acknowledge_seconds_count", {"severity": "high"}) == 1
    assert value("incidentd_incident_time_to_acknowledge_seconds_sum", {"severity": "high"}) == pytest.approx(
        299.877
    )
    assert (
        value("incidentd_incidents_resolved_total", {"source": "alertmanager", "severity": "critical"}) == 1
    )
    assert value("incidentd_incident_time_to_resolve_seconds_sum", {"severity": "critical"}) == 25 * 60
    assert value("incidentd_incidents_active", {"severity": "critical", "service": "checkout"}) == 1
    assert value("incidentd_incidents_active", {"severity": "high", "service": "orders-db"}) == 1
    assert b"incidentd_incidents_active" in generate_latest(registry)


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("INCIDENTD_SQLITE_PATH", str(tmp_path / "cli.db"))
    monkeypatch.setenv("INCIDENTD_LOG_LEVEL", "error")
    return CliRunner()


def test_list_shows_correlation_groups_and_show_the_timeline(runner: CliRunner) -> None:
    """After the README's first command, ``incidents list`` groups the two checkout alerts, --json
    carries the group, and ``incidents show`` prints the incident with its timeline."""
    assert runner.invoke(cli, ["worker", "--from", str(EXAMPLES)]).exit_code == 0
    listed = runner.invoke(cli, ["incidents", "list"])
    assert listed.exit_code == 0
    assert "checkout/production  2 incident(s)" in listed.output
    found = json.loads(runner.invoke(cli, ["incidents", "list", "--json", "--service", "orders-db"]).output)
    [orders] = found
    assert orders["status"] == "acknowledged" and orders["correlation_group"]
    shown = runner.invoke(cli, ["incidents", "show", orders["id"]])
    assert shown.exit_code == 0
    assert "acknowledged" in shown.output and "jane.doe@example.com  Looking at it" in shown.output
    missing = runner.invoke(cli, ["incidents", "show", str(uuid.uuid4())])
    assert missing.exit_code == 1 and "no incident" in missing.output


@pytest.mark.parametrize("verb", ["ack", "resolve"])
def test_ack_and_resolve_with_the_memory_broker_say_why_they_cannot_publish(
    runner: CliRunner, verb: str
) -> None:
    """ack/resolve publish a command for the worker; the in-process memory broker cannot carry it, and
    the CLI says so exactly as ``publish`` does."""
    result = runner.invoke(cli, ["incidents", verb, str(uuid.uuid4()), "--note", "on it"])
    published = runner.invoke(cli, ["publish", "incident.acknowledge", "-"], input="{}")
    assert result.exit_code == 2 == published.exit_code
    assert "the memory broker lives inside one worker process" in result.output
    assert result.output.splitlines()[-1] == published.output.splitlines()[-1]
