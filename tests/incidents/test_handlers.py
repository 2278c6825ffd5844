"""The handlers on the real payload fixtures (Alertmanager v4, OEC, EventBridge), into SQLite."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from application.commands import AcknowledgeIncident, Command
from application.dispatcher import bind, bind_all
from application.errors import PermanentError
from application.handlers import HANDLERS
from application.incidents import Incident, IncidentPolicy
from application.ports import ActionTrigger, PlannedAction
from application.side_effects import after_commit
from infra.sqlite.store import SqliteStore
from tests.incidents.conftest import alertmanager, aws, context, oec, payload


async def handle(
    store: SqliteStore, deps: dict[str, Any], command: Command, message_id: str | None = None
) -> None:
    ctx = context(message_id)  # one delivery: every handler of the list sees the same message
    deps = {"store": store, **deps}
    for handler in (*bind(HANDLERS, deps)[type(command)], *bind_all([after_commit], deps)):
        await handler(command, ctx)


async def by_key(store: SqliteStore, key: str) -> list[Incident]:
    return sorted((i for i in await store.list() if i.dedup_key == key), key=lambda i: i.created_at)


async def test_alertmanager_batch_opens_one_incident_per_alert(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """Each alert of a v4 batch becomes an incident with service/environment/severity from the
    configured labels (job, env, severity), its runbook annotation, and the group's groupKey and
    commonLabels; both share the checkout/production correlation group."""
    await handle(sqlite_store, deps, alertmanager())
    [first] = await by_key(sqlite_store, "alertmanager:c1f0a2b3d4e5f607")
    [second] = await by_key(sqlite_store, "alertmanager:d2e1b3c4f5a60718")
    assert (first.service, first.environment, first.severity) == ("checkout", "production", "critical")
    assert first.runbook_url == "https://runbooks.example.com/checkout/high-error-rate"
    assert second.runbook_url == ""
    assert first.source_alert["groupKey"] == payload("alertmanager_firing")["groupKey"]
    assert first.source_alert["commonLabels"]["alertname"] == "HighErrorRate"
    assert first.correlation_group == second.correlation_group == str(first.id)


async def test_repeated_firing_counts_occurrences_and_resolution_resolves(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """A repeated notification (a new message) counts an occurrence on the open incident; the resolved
    notification resolves only the alert it lists, at its endsAt."""
    await handle(sqlite_store, deps, alertmanager())
    await handle(sqlite_store, deps, alertmanager())
    await handle(sqlite_store, deps, alertmanager("alertmanager_resolved"))
    [resolved] = await by_key(sqlite_store, "alertmanager:c1f0a2b3d4e5f607")
    [still_open] = await by_key(sqlite_store, "alertmanager:d2e1b3c4f5a60718")
    assert resolved.status == "resolved" and resolved.occurrences == 2
    assert (
        resolved.resolved_at is not None and resolved.resolved_at.isoformat() == "2026-11-23T10:25:00+00:00"
    )
    assert still_open.status == "open" and still_open.occurrences == 2


async def test_stale_firing_after_resolution_does_not_reopen_but_a_new_one_opens_a_successor(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """The original firing delivered late (startsAt before the resolution) leaves the incident resolved;
    a firing that starts after the resolution opens a new incident that names its predecessor."""
    await handle(sqlite_store, deps, alertmanager())
    await handle(sqlite_store, deps, alertmanager("alertmanager_resolved"))
    await handle(sqlite_store, deps, alertmanager())  # stale redelivery by a relay, new message id
    [old] = await by_key(sqlite_store, "alertmanager:c1f0a2b3d4e5f607")
    assert old.status == "resolved"
    later = payload("alertmanager_firing")
    later["alerts"][0]["startsAt"] = "2026-11-23T11:00:00Z"
    await handle(sqlite_store, deps, alertmanager(alerts=later["alerts"][:1]))
    old, new = await by_key(sqlite_store, "alertmanager:c1f0a2b3d4e5f607")
    assert (old.status, new.status) == ("resolved", "open")
    assert new.predecessor == old.id and new.occurrences == 1


async def test_resolution_before_firing_keeps_the_incident_resolved(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """A resolved notification that overtakes its firing records a resolved incident; the firing that
    arrives afterwards does not open it again."""
    await handle(sqlite_store, deps, alertmanager("alertmanager_resolved"))
    await handle(sqlite_store, deps, alertmanager())
    [incident] = await by_key(sqlite_store, "alertmanager:c1f0a2b3d4e5f607")
    assert incident.status == "resolved"
    assert incident.created_at.isoformat() == "2026-11-23T10:00:00+00:00"


async def test_correlation_window_separates_incidents_far_apart(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """Incidents of one service/environment opened more than correlation_window apart get separate groups."""
    deps = {**deps, "policy": IncidentPolicy(correlation_window=60)}
    data = payload("alertmanager_firing")
    data["alerts"][1]["startsAt"] = "2026-11-23T12:00:00Z"
    await handle(sqlite_store, deps, alertmanager(alerts=data["alerts"][:1]))
    await handle(sqlite_store, deps, alertmanager(alerts=data["alerts"][1:]))
    groups = {i.correlation_group for i in await sqlite_store.list()}
    assert len(groups) == 2


async def test_label_names_come_from_the_policy(sqlite_store: SqliteStore, deps: dict[str, Any]) -> None:
    """With service_labels=["deployment"] and severity_label="level", those labels decide."""
    deps = {**deps, "policy": IncidentPolicy(service_labels=("deployment",), severity_label="level")}
    data = payload("alertmanager_firing")
    data["alerts"][0]["labels"]["level"] = "warning"
    await handle(sqlite_store, deps, alertmanager(alerts=data["alerts"][:1]))
    [incident] = await sqlite_store.list()
    assert (incident.service, incident.severity) == ("checkout", "medium")


async def test_oec_acknowledge_before_create_opens_from_the_payload(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """An Acknowledge that overtakes its Create opens the incident from the alert it carries (at its
    createdAt) and acknowledges it; the late Create adds no second incident and no occurrence."""
    await handle(sqlite_store, deps, oec("oec_acknowledge"))
    await handle(sqlite_store, deps, oec("oec_create"))
    [incident] = await sqlite_store.list()
    assert incident.status == "acknowledged" and incident.occurrences == 1
    assert (incident.service, incident.environment, incident.severity) == ("orders-db", "production", "high")
    assert incident.acknowledged_at is not None
    assert (incident.acknowledged_at - incident.created_at).total_seconds() == pytest.approx(299.877)
    assert [e.kind for e in incident.timeline] == ["opened", "acknowledged", "action"]


async def test_oec_actions_map_to_transitions(sqlite_store: SqliteStore, deps: dict[str, Any]) -> None:
    """AssignOwnership / TakeOwnership set the assignee, AddNote notes, UnAcknowledge reopens, Close
    resolves."""
    base = 1763892300000000000
    steps = [("Create", {}), ("Acknowledge", {}), ("AssignOwnership", {"owner": "bob@example.com"}),
             ("AddNote", {"note": "failing over"}), ("UnAcknowledge", {}),
             ("TakeOwnership", {"username": "carol@example.com"}),
             ("Close", {"note": "lag gone"})]  # fmt: skip
    for n, (action, alert) in enumerate(steps):
        await handle(
            sqlite_store, deps, oec("oec_create", action=action, updatedAt=base + n * 10**9, **alert)
        )
        [incident] = await sqlite_store.list()
        if action == "UnAcknowledge":
            assert incident.status == "open" and incident.assignee == "bob@example.com"
    assert (incident.status, incident.assignee) == ("resolved", "carol@example.com")
    notes = [e.note for e in incident.timeline]
    assert "failing over" in notes and "lag gone" in notes


class RecordingRunner:
    """Answers restartDeployment with one action; knows no other."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []

    def plan(self, trigger: ActionTrigger) -> list[PlannedAction]:
        if trigger.event != "restartDeployment":
            return []
        return [PlannedAction("restart", "restart", "deployment orders-db")]

    async def run(self, action: PlannedAction, incident: Incident) -> str:
        self.ran.append((action.rule, incident.dedup_key))
        return "restarted deployment orders-db"


async def test_custom_oec_actions_go_to_the_runner_and_onto_the_timeline(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """A custom action is recorded, then answered by the action runner after the commit, its result a
    timeline entry of its own; an action no rule answers is still recorded, never dropped."""
    runner = RecordingRunner()
    deps = {**deps, "actions": runner}
    await handle(sqlite_store, deps, oec("oec_create", action="restartDeployment"))
    await handle(sqlite_store, deps, oec("oec_create", action="EscalateToNext"))
    [incident] = await sqlite_store.list()
    assert runner.ran == [("restart", "opsgenie:orders-db-replication-lag")]
    actions = [(e.actor, e.note) for e in incident.timeline if e.kind == "action"]
    assert actions == [
        ("System", "restartDeployment"),
        ("incidentd", "restart: restarted deployment orders-db"),
        ("System", "EscalateToNext"),
    ]


async def test_aws_health_opens_and_closes_per_event_arn(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """An open Health event opens an incident (service EC2, account as environment, 'issue' = high);
    the closed event for the same eventArn resolves it."""
    await handle(sqlite_store, deps, aws("aws_health"))
    data = payload("aws_health")
    closed = aws("aws_health", statusCode="closed")
    closed = closed.model_copy(update={"time": closed.time.replace(hour=11)})
    await handle(sqlite_store, deps, closed)
    [incident] = await sqlite_store.list()
    assert (incident.service, incident.environment, incident.severity) == ("EC2", "123456789012", "high")
    assert incident.status == "resolved" and incident.source_alert["eventArn"] == data["detail"]["eventArn"]


@pytest.mark.parametrize(
    ("change", "status"),
    [({}, "open"), ({"Workflow": {"Status": "RESOLVED"}}, "resolved"),
     ({"Workflow": {"Status": "SUPPRESSED"}}, "resolved"), ({"RecordState": "ARCHIVED"}, "resolved")],
)  # fmt: skip
async def test_security_hub_findings_open_and_resolve_per_finding_id(
    sqlite_store: SqliteStore, deps: dict[str, Any], change: dict[str, Any], status: str
) -> None:
    """A NEW finding opens a high-severity incident; a later import of the same finding Id with workflow
    RESOLVED or SUPPRESSED, or RecordState ARCHIVED, resolves it."""
    await handle(sqlite_store, deps, aws("aws_securityhub"))
    findings = copy.deepcopy(payload("aws_securityhub")["detail"]["findings"])
    findings[0].update({"UpdatedAt": "2026-11-23T10:29:00.000Z", **change})
    await handle(sqlite_store, deps, aws("aws_securityhub", findings=findings))
    [incident] = await sqlite_store.list()
    assert (incident.severity, incident.status) == ("high", status)


async def test_acknowledge_by_unknown_id_is_permanent(
    sqlite_store: SqliteStore, deps: dict[str, Any]
) -> None:
    """An incident id the store never had cannot appear later (ids are made by the worker): dead-letter."""
    with pytest.raises(PermanentError):
        await handle(
            sqlite_store, deps, AcknowledgeIncident(incident_id="00000000-0000-4000-8000-000000000000")
        )
