"""Incident metrics as Prometheus would scrape them, and the ``incidents`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

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


ROOT = Path(__file__).parent.parent.parent


@pytest.fixture
def incidentd(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs ``python app.py ...`` as a user would (a process of its own: logging set-up stays there)."""
    env = {**os.environ, "INCIDENTD_SQLITE_PATH": str(tmp_path / "cli.db"), "INCIDENTD_LOG_LEVEL": "error"}
    env.pop("INCIDENTD_BROKER", None)

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, env=env, input=stdin,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    return run


def test_list_shows_correlation_groups_and_show_the_timeline(incidentd: Callable[..., Any]) -> None:
    """After the README's first command, ``incidents list`` groups the two checkout alerts, --json
    carries the group, and ``incidents show`` prints the incident with its timeline."""
    assert incidentd("worker", "--from", str(EXAMPLES)).returncode == 0
    listed = incidentd("incidents", "list")
    assert listed.returncode == 0
    assert "checkout/production  2 incident(s)" in listed.stdout
    [orders] = json.loads(incidentd("incidents", "list", "--json", "--service", "orders-db").stdout)
    assert orders["status"] == "acknowledged" and orders["correlation_group"]
    shown = incidentd("incidents", "show", orders["id"])
    assert shown.returncode == 0
    assert "acknowledged" in shown.stdout and "jane.doe@example.com  Looking at it" in shown.stdout
    missing = incidentd("incidents", "show", str(uuid.uuid4()))
    assert missing.returncode == 1 and "no incident" in missing.stderr


def test_ack_and_resolve_with_the_memory_broker_say_why_they_cannot_publish(
    incidentd: Callable[..., Any],
) -> None:
    """ack/resolve publish a command for the worker; the in-process memory broker cannot carry it, and
    the CLI says so exactly as ``publish`` does."""
    published = incidentd("publish", "incident.acknowledge", "-", stdin="{}")
    for verb in ("ack", "resolve"):
        result = incidentd("incidents", verb, str(uuid.uuid4()), "--note", "on it")
        assert result.returncode == 2 == published.returncode
        assert "the memory broker lives inside one worker process" in result.stderr
        assert result.stderr.splitlines()[-1] == published.stderr.splitlines()[-1]
