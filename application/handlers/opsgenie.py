"""Opsgenie Edge Connector (OEC) actions: transitions of the incident matched by the alert's alias."""

from __future__ import annotations

from datetime import UTC, datetime

from application.commands import OpsgenieAction
from application.dispatcher import Context
from application.handlers.events import Fields, LockedIncidents, message_transaction
from application.incidents import Incident, IncidentPolicy, normalise_severity
from application.ports import ChangedIncident, IncidentStore


async def opsgenie_action(
    cmd: OpsgenieAction, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    """OEC actions become transitions of the incident matched by the alert's alias (else its alertId).

    An action that arrives before its Create opens the incident from the payload (OEC sends the whole
    alert, with its ``createdAt``) instead of retrying: the Create may never come (OEC forwards only the
    actions it is configured for), and the entity's time rules make a late Create harmless. A custom
    action (``restartDeployment``) is recorded here; the action rules answer it after the commit (the
    action's name is the trigger, the alert's details the labels they match).
    """
    alert = cmd.alert
    key = _oec_key(cmd)
    created = _epoch_ms(alert.created_at)
    at = _epoch_ns(alert.updated_at) if alert.updated_at else created
    actor = alert.username or "opsgenie"
    changes = [ChangedIncident(key, trigger=cmd.action, labels=alert.details)]
    async with message_transaction(store, ctx, changes) as tx:
        if tx.already_processed:
            return
        incidents = LockedIncidents(tx, ctx, policy)
        fields = _oec_fields(cmd)
        await incidents.load([key], [(fields["service"], fields["environment"])])
        current = incidents.latest.get(key)
        known = current is not None and current.source_alert.get("alertId") == alert.alert_id
        if cmd.action == "Create":
            if known and current is not None:
                current.record_action(action="Create", at=created, actor=actor, message_id=ctx.message_id,
                                      note="already known")  # fmt: skip
                await tx.update(current)
            else:
                await incidents.fire(key, created, actor, fields)
            return
        if not known:
            await incidents.fire(
                key, created, actor, fields, note=f"opened from {cmd.action}; no Create seen"
            )
        incident = incidents.latest[key]
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


def _epoch_ms(value: int | None) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC) if value else datetime.now(UTC)


def _epoch_ns(value: int) -> datetime:
    """OEC's ``updatedAt`` is in nanoseconds (``createdAt`` in milliseconds)."""
    return datetime.fromtimestamp(value / 1_000_000_000, UTC)
