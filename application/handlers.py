"""Handlers: ``async def handle(command, context, <dependencies by name>)``, registered in ``HANDLERS``.

Each handler makes its changes inside one store transaction keyed by the message's idempotency key, so a
redelivered message changes nothing the second time. Every source reduces to the same few events on a
dedup key - *fired*, *resolved*, *acknowledged*... at the event's own time - and the rules for those
live in the entity (application/incidents.py); :class:`_Work` only finds the incident an event is for.

After the store handler, the same list runs the side effects (Kubernetes enrichment, action rules,
GitHub, Slack) outside its transaction: see application/side_effects.py for the order and why it is
redelivery-safe.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from application.commands import (
    AcknowledgeIncident,
    AddNote,
    Alert,
    AlertmanagerWebhook,
    AwsEvent,
    Command,
    CreateIncident,
    Finding,
    HealthDetail,
    IncidentRef,
    OpsgenieAction,
    ResolveIncident,
    SecurityHubDetail,
)
from application.dispatcher import Context, Handler
from application.errors import PermanentError, TransientError
from application.incidents import (
    Incident,
    IncidentPolicy,
    OpenGroup,
    SeverityName,
    correlation_group,
    normalise_severity,
)
from application.ports import ActionRunner, Cluster, IncidentStore, IssueTracker, Notifier, Transaction
from application.side_effects import Touched, enrich, follow_up

log = structlog.get_logger("incidentd.handlers")

Fields = dict[str, Any]  # the fields of an incident this event would open


class _Work:
    """The incidents one message touches: locked and loaded once, then changed event by event."""

    def __init__(self, tx: Transaction, ctx: Context, policy: IncidentPolicy) -> None:
        self._tx = tx
        self._ctx = ctx
        self._policy = policy
        self.latest: dict[str, Incident] = {}
        self._scopes: list[tuple[str, str]] = []
        self._groups: dict[str, OpenGroup] | None = None  # read once, when the first incident opens

    async def load(self, dedup_keys: Collection[str], scopes: Collection[tuple[str, str]] = ()) -> None:
        """Lock and read the dedup keys; remember the (service, environment) scopes of new incidents.

        A scope is locked only when an incident is about to be opened in it (so that two incidents
        opened at once agree on their correlation group), and then all of them at once, after the
        dedup keys: every transaction locks in that order, so none waits on another in a cycle.
        """
        self._scopes = _Work.scopes(scopes)
        self.latest = await self._tx.latest(dedup_keys)

    def correlate_in(self, scopes: Collection[tuple[str, str]]) -> None:
        """Narrow the scopes locked and read at the first opening to these (every opening's scope)."""
        self._scopes = _Work.scopes(scopes)

    @staticmethod
    def scopes(scopes: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The scopes :meth:`load` would lock (incidents without a service are not correlated), for
        announcing them to ``store.transaction``."""
        return sorted({scope for scope in scopes if scope[0]})

    async def fire(self, key: str, at: datetime, actor: str, fields: Fields, note: str = "") -> Incident:
        """Open an incident, count an occurrence on the open one (dedup), or open a successor."""
        current = self.latest.get(key)
        if current is not None and not current.starts_new_episode(at):
            current.record_occurrence(at=at, actor=actor, message_id=self._ctx.message_id, note=note)
            await self._tx.update(current)
            return current
        opened: dict[str, Any] = {
            "message_id": self._ctx.message_id,
            "note": note,
            "dedup_key": key,
            **fields,
        }
        if current is not None:
            new = current.successor(at=at, actor=actor, **opened)
        else:
            new = Incident.open(at=at, actor=actor, **opened)
        groups = await self._open_groups()
        new.correlation_group = correlation_group(new, groups.values(), self._policy.window)
        joined = groups.get(new.correlation_group) or OpenGroup.started_by(new)
        groups[new.correlation_group] = joined.joined_by(new)
        self.latest[key] = new
        await self._tx.add(new)
        return new

    async def resolve(
        self,
        key: str,
        at: datetime,
        actor: str,
        fields: Fields,
        *,
        started: datetime | None = None,
        note: str = "",
    ) -> Incident:
        """Resolve the latest incident; with none yet, keep an already-resolved one (see the entity)."""
        current = self.latest.get(key)
        if current is not None:
            current.resolve(at=at, actor=actor, message_id=self._ctx.message_id, note=note)
            await self._tx.update(current)
            return current
        new = Incident.already_resolved(
            started=started, at=at, actor=actor, message_id=self._ctx.message_id, dedup_key=key, **fields
        )
        new.correlation_group = str(new.id)
        self.latest[key] = new
        await self._tx.add(new)
        return new

    async def _open_groups(self) -> dict[str, OpenGroup]:
        if self._groups is None:
            found = await self._tx.open_groups(self._scopes) if self._scopes else []
            self._groups = {group.name: group for group in found}
        return self._groups


# --- Alertmanager ----------------------------------------------------------------------------------


async def alertmanager_webhook(
    cmd: AlertmanagerWebhook, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    """Each alert of the batch, by fingerprint: firing opens (or counts an occurrence), resolved resolves."""
    alerts = [(_alert_key(a), a, {**cmd.common_labels, **a.labels}) for a in cmd.alerts]
    keys = [key for key, _, _ in alerts]
    async with store.transaction(ctx.idempotency_key, keys) as tx:
        if tx.already_processed:
            return
        work = _Work(tx, ctx, policy)
        await work.load(keys)
        # Correlation scopes are locked (in one statement, after the keys) only where an incident opens.
        work.correlate_in(_opening_scopes(alerts, work, policy))
        for key, alert, labels in alerts:
            fields = _alert_fields(cmd, alert, labels, policy)
            if alert.status == "firing":
                await work.fire(key, alert.starts_at, "alertmanager", fields)
            else:
                ended = _real_time(alert.ends_at) or alert.starts_at
                await work.resolve(key, ended, "alertmanager", fields, started=alert.starts_at)


def _opening_scopes(
    alerts: list[tuple[str, Alert, dict[str, str]]], work: _Work, policy: IncidentPolicy
) -> list[tuple[str, str]]:
    """The scopes in which this batch may open an incident: those of its firing alerts whose key has no
    incident or one that this firing succeeds (a key named twice in the batch counts as opening). Locking
    only these, not every scope of the batch, is what keeps batches of different services apart."""
    counts: dict[str, int] = {}
    for key, _, _ in alerts:
        counts[key] = counts.get(key, 0) + 1
    opening = []
    for key, alert, labels in alerts:
        if alert.status != "firing":
            continue
        current = work.latest.get(key)
        if counts[key] > 1 or current is None or current.starts_new_episode(alert.starts_at):
            opening.append(_scope(labels, policy))
    return _Work.scopes(opening)


def _alert_key(alert: Alert) -> str:
    return f"alertmanager:{alert.fingerprint}"


def _scope(labels: dict[str, str], policy: IncidentPolicy) -> tuple[str, str]:
    return policy.pick(labels, policy.service_labels), policy.pick(labels, policy.environment_labels)


def _alert_fields(
    cmd: AlertmanagerWebhook, alert: Alert, labels: dict[str, str], policy: IncidentPolicy
) -> Fields:
    service, environment = _scope(labels, policy)
    return {
        "title": alert.annotations.get("summary") or labels.get("alertname", "alert"),
        "service": service,
        "environment": environment,
        "severity": policy.severity(labels),
        "source": "alertmanager",
        "runbook_url": alert.annotations.get("runbook_url") or cmd.common_annotations.get("runbook_url", ""),
        "source_alert": {
            "fingerprint": alert.fingerprint, "status": alert.status,
            "startsAt": alert.starts_at.isoformat(), "labels": alert.labels,
            "annotations": alert.annotations, "generatorURL": alert.generator_url,
            "groupKey": cmd.group_key, "commonLabels": cmd.common_labels, "externalURL": cmd.external_url,
        },
    }  # fmt: skip


def _real_time(value: datetime | None) -> datetime | None:
    """Alertmanager sends ``0001-01-01T00:00:00Z`` for "no end yet"."""
    return value if value is not None and value.year > 1970 else None


# --- Opsgenie Edge Connector -------------------------------------------------------------------------


async def opsgenie_action(
    cmd: OpsgenieAction, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    """OEC actions become transitions of the incident matched by the alert's alias (else its alertId).

    An action that arrives before its Create opens the incident from the payload (OEC sends the whole
    alert, with its ``createdAt``) instead of retrying: the Create may never come (OEC forwards only the
    actions it is configured for), and the entity's time rules make a late Create harmless. A custom
    action (``restartDeployment``) is recorded here; the action rules answer it after the commit.
    """
    alert = cmd.alert
    key = _oec_key(cmd)
    created = _epoch_ms(alert.created_at)
    at = _epoch_ns(alert.updated_at) if alert.updated_at else created
    actor = alert.username or "opsgenie"
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        work = _Work(tx, ctx, policy)
        fields = _oec_fields(cmd)
        await work.load([key], [(fields["service"], fields["environment"])])
        current = work.latest.get(key)
        known = current is not None and current.source_alert.get("alertId") == alert.alert_id
        if cmd.action == "Create":
            if known and current is not None:
                current.record_action(action="Create", at=created, actor=actor, message_id=ctx.message_id,
                                      note="already known")  # fmt: skip
                await tx.update(current)
            else:
                await work.fire(key, created, actor, fields)
            return
        if not known:
            await work.fire(key, created, actor, fields, note=f"opened from {cmd.action}; no Create seen")
        incident = work.latest[key]
        _apply_oec(cmd, incident, at, actor, ctx)
        await tx.update(incident)


def _oec_key(cmd: OpsgenieAction) -> str:
    return f"opsgenie:{cmd.alert.alias or cmd.alert.alert_id}"


def _apply_oec(cmd: OpsgenieAction, incident: Incident, at: datetime, actor: str, ctx: Context) -> None:
    alert, mid = cmd.alert, ctx.message_id
    if cmd.action == "Acknowledge":
        incident.acknowledge(at=at, actor=actor, message_id=mid, note=alert.note)
    elif cmd.action == "UnAcknowledge":
        incident.unacknowledge(at=at, actor=actor, message_id=mid, note=alert.note)
    elif cmd.action == "AddNote":
        incident.add_note(note=alert.note, at=at, actor=actor, message_id=mid)
    elif cmd.action == "Close":
        incident.resolve(at=at, actor=actor, message_id=mid, note=alert.note)
    elif cmd.action == "AssignOwnership":
        incident.assign(owner=alert.owner or actor, at=at, actor=actor, message_id=mid)
    elif cmd.action == "TakeOwnership":
        incident.assign(owner=actor, at=at, actor=actor, message_id=mid)
    else:
        incident.record_action(action=cmd.action, at=at, actor=actor, message_id=mid, note=alert.note)


def _oec_fields(cmd: OpsgenieAction) -> Fields:
    alert = cmd.alert
    fields = {
        "title": alert.message or alert.alias or alert.alert_id,
        "severity": normalise_severity(alert.priority),
        "service": alert.details.get("service", alert.entity),
        "environment": alert.details.get("environment", ""),
        "source": "opsgenie",
        "runbook_url": alert.details.get("runbook_url", ""),
        "source_alert": {"alertId": alert.alert_id, "alias": alert.alias, "tags": alert.tags,
                         "entity": alert.entity, "source": alert.source, "description": alert.description,
                         "integrationName": cmd.integration_name},
    }  # fmt: skip
    return fields


# --- AWS Health and Security Hub -----------------------------------------------------------------------

_HEALTH_SEVERITY: dict[str, SeverityName] = {"issue": "high", "scheduledChange": "low",
                                             "accountNotification": "info"}  # fmt: skip


async def aws_event(cmd: AwsEvent, ctx: Context, store: IncidentStore, policy: IncidentPolicy) -> None:
    """AWS Health events open/close per eventArn; Security Hub findings open/resolve per finding Id."""
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        work = _Work(tx, ctx, policy)
        if isinstance(cmd.detail, HealthDetail):
            await _health(cmd, cmd.detail, work)
        elif isinstance(cmd.detail, SecurityHubDetail):
            await _findings(cmd, cmd.detail, work)


async def _health(cmd: AwsEvent, detail: HealthDetail, work: _Work) -> None:
    key = _health_key(detail)
    await work.load([key], [(detail.service, cmd.account)])
    description = detail.event_description[0].get("latestDescription", "") if detail.event_description else ""
    fields = {
        "title": f"AWS Health: {detail.event_type_code} ({detail.service}, {cmd.region})",
        "service": detail.service, "environment": cmd.account,
        "severity": _HEALTH_SEVERITY.get(detail.event_type_category, "medium"),
        "source": "aws.health",
        "source_alert": {"eventArn": detail.event_arn, "eventTypeCode": detail.event_type_code,
                         "eventTypeCategory": detail.event_type_category, "statusCode": detail.status_code,
                         "region": cmd.region, "description": description,
                         "affectedEntities": detail.affected_entities},
    }  # fmt: skip
    if detail.status_code == "closed":
        await work.resolve(key, cmd.time, "aws.health", fields)
    else:
        await work.fire(key, cmd.time, "aws.health", fields)


def _health_key(detail: HealthDetail) -> str:
    return f"aws.health:{detail.event_arn}"


def _finding_key(finding: Finding) -> str:
    return f"aws.securityhub:{finding.id}"


def _finding_closed(finding: Finding) -> bool:
    """Workflow RESOLVED or SUPPRESSED resolves, and so does an ARCHIVED record (the control is gone)."""
    workflow = finding.workflow.status if finding.workflow is not None else ""
    return finding.record_state == "ARCHIVED" or workflow in ("RESOLVED", "SUPPRESSED")


async def _findings(cmd: AwsEvent, detail: SecurityHubDetail, work: _Work) -> None:
    keyed = [(_finding_key(f), f) for f in detail.findings]
    await work.load(
        [k for k, _ in keyed], {("securityhub", f.aws_account_id or cmd.account) for _, f in keyed}
    )
    for key, finding in keyed:
        at = _iso(finding.updated_at) or cmd.time
        fields = {
            "title": finding.title, "service": "securityhub",
            "environment": finding.aws_account_id or cmd.account,
            "severity": normalise_severity(finding.severity.label), "source": "aws.securityhub",
            "source_alert": {"Id": finding.id, "Severity": finding.severity.label, "region": cmd.region,
                             "Description": finding.description, "Resources": finding.resources,
                             "RecordState": finding.record_state,
                             "Workflow": finding.workflow.status if finding.workflow else ""},
        }  # fmt: skip
        if _finding_closed(finding):
            await work.resolve(key, at, "aws.securityhub", fields, started=_iso(finding.created_at))
        else:
            await work.fire(key, at, "aws.securityhub", fields)


# --- incidentd's own commands -------------------------------------------------------------------------


async def create_incident(
    cmd: CreateIncident, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    key = _manual_key(cmd, ctx)
    fields = {
        "title": cmd.title, "service": cmd.service, "environment": cmd.environment, "severity": cmd.severity,
        "source": "manual", "runbook_url": cmd.runbook_url,
        "source_alert": {"description": cmd.description} if cmd.description else {},
    }  # fmt: skip
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        work = _Work(tx, ctx, policy)
        await work.load([key], [(cmd.service, cmd.environment)])
        await work.fire(key, cmd.at, cmd.actor, fields)


def _manual_key(cmd: CreateIncident, ctx: Context) -> str:
    return cmd.dedup_key or f"manual:{ctx.idempotency_key}"


async def acknowledge_incident(cmd: AcknowledgeIncident, ctx: Context, store: IncidentStore) -> None:
    async with store.transaction(ctx.idempotency_key) as tx:
        if not tx.already_processed:
            incident = await _referenced(tx, cmd)
            incident.acknowledge(at=cmd.at, actor=cmd.actor, message_id=ctx.message_id, note=cmd.note)
            await tx.update(incident)


async def resolve_incident(cmd: ResolveIncident, ctx: Context, store: IncidentStore) -> None:
    async with store.transaction(ctx.idempotency_key) as tx:
        if not tx.already_processed:
            incident = await _referenced(tx, cmd)
            incident.resolve(at=cmd.at, actor=cmd.actor, message_id=ctx.message_id, note=cmd.note)
            await tx.update(incident)


async def add_note(cmd: AddNote, ctx: Context, store: IncidentStore) -> None:
    async with store.transaction(ctx.idempotency_key) as tx:
        if not tx.already_processed:
            incident = await _referenced(tx, cmd)
            incident.add_note(note=cmd.note, at=cmd.at, actor=cmd.actor, message_id=ctx.message_id)
            await tx.update(incident)


async def _referenced(tx: Transaction, cmd: IncidentRef) -> Incident:
    if cmd.incident_id is not None:
        incident = await tx.get(cmd.incident_id)
        if incident is None:
            # Ids are made by the worker when it opens an incident: an unknown id never appears later.
            raise PermanentError(f"no incident {cmd.incident_id}")
        return incident
    found = (await tx.latest([cmd.dedup_key])).get(cmd.dedup_key)
    if found is None:
        # The create may still be in flight (deliveries are not ordered): retry, bounded by max_attempts.
        raise TransientError(f"no incident with dedup key {cmd.dedup_key!r} (yet)")
    return found


def _epoch_ms(value: int | None) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC) if value else datetime.now(UTC)


def _epoch_ns(value: int) -> datetime:
    """OEC's ``updatedAt`` is in nanoseconds (``createdAt`` in milliseconds)."""
    return datetime.fromtimestamp(value / 1_000_000_000, UTC)


def _iso(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


# --- side effects, after the store handler (application/side_effects.py) -----------------------------


async def enrich_from_cluster(
    cmd: AlertmanagerWebhook,
    ctx: Context,
    store: IncidentStore,
    policy: IncidentPolicy,
    cluster: Cluster | None,
) -> None:
    """Firing alerts that name a Deployment get its state on their incident, or that it is missing."""
    if cluster is None:
        return
    targets: dict[str, tuple[str, str]] = {}
    for alert in cmd.alerts:
        workload = policy.workload({**cmd.common_labels, **alert.labels})
        if alert.status == "firing" and workload is not None:
            targets[_alert_key(alert)] = workload
    if targets:
        await enrich(targets, ctx, store, cluster)


async def after_commit(
    cmd: Command,
    ctx: Context,
    store: IncidentStore,
    actions: ActionRunner,
    issue_tracker: IssueTracker | None,
    notifier: Notifier | None,
) -> None:
    """Action rules, the GitHub issue and Slack for the incidents the store handler changed."""
    await follow_up(_touched(cmd, ctx), ctx, store, actions=actions, tracker=issue_tracker, notifier=notifier)


def _touched(cmd: Command, ctx: Context) -> list[Touched]:
    """The incidents a command's store handler changes, and what action rules may answer there."""
    if isinstance(cmd, AlertmanagerWebhook):
        return [
            Touched(_alert_key(a), trigger="opened" if a.status == "firing" else "",
                    labels={**cmd.common_labels, **a.labels})
            for a in cmd.alerts
        ]  # fmt: skip
    if isinstance(cmd, OpsgenieAction):
        return [Touched(_oec_key(cmd), trigger=cmd.action, labels=cmd.alert.details)]
    if isinstance(cmd, AwsEvent):
        if isinstance(cmd.detail, HealthDetail):
            return [Touched(_health_key(cmd.detail))]
        if isinstance(cmd.detail, SecurityHubDetail):
            return [Touched(_finding_key(f)) for f in cmd.detail.findings]
        return []
    if isinstance(cmd, CreateIncident):
        return [Touched(_manual_key(cmd, ctx))]
    if isinstance(cmd, IncidentRef):
        return [Touched(cmd.dedup_key if cmd.incident_id is None else "", cmd.incident_id)]
    return []


HANDLERS: dict[type[Command], Sequence[Handler]] = {
    AlertmanagerWebhook: [alertmanager_webhook, enrich_from_cluster, after_commit],
    OpsgenieAction: [opsgenie_action, after_commit],
    AwsEvent: [aws_event, after_commit],
    CreateIncident: [create_incident, after_commit],
    AcknowledgeIncident: [acknowledge_incident, after_commit],
    ResolveIncident: [resolve_incident, after_commit],
    AddNote: [add_note, after_commit],
}
