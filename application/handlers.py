"""Handlers: ``async def handle(command, context, <dependencies by name>)``, registered in ``HANDLERS``.

Each handler makes its changes inside one store transaction keyed by the message's idempotency key, so a
redelivered message changes nothing the second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from application.commands import (
    AcknowledgeIncident,
    AddNote,
    AlertmanagerWebhook,
    AwsEvent,
    Command,
    CreateIncident,
    HealthDetail,
    IncidentRef,
    OpsgenieAction,
    ResolveIncident,
    SecurityHubDetail,
)
from application.dispatcher import Context, Handler
from application.errors import TransientError
from application.incidents import Incident, IncidentPolicy, SeverityName, normalise_severity
from application.ports import IncidentStore, Transaction

log = structlog.get_logger("incidentd.handlers")


async def alertmanager_webhook(
    cmd: AlertmanagerWebhook, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    """One incident per alert fingerprint: firing opens (or counts an occurrence), resolved resolves."""
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        for alert in cmd.alerts:
            key = f"alertmanager:{alert.fingerprint}"
            incident = await tx.find_open(key)
            if alert.status == "resolved":
                if incident is not None:
                    incident.resolve(
                        at=alert.ends_at or alert.starts_at, actor="alertmanager", message_id=ctx.message_id
                    )
                    await tx.update(incident)
                continue
            if incident is not None:
                incident.record_occurrence(
                    at=alert.starts_at, actor="alertmanager", message_id=ctx.message_id
                )
                await tx.update(incident)
                continue
            labels = {**cmd.common_labels, **alert.labels}
            await tx.add(
                Incident.open(
                    at=alert.starts_at,
                    actor="alertmanager",
                    message_id=ctx.message_id,
                    title=alert.annotations.get("summary") or labels.get("alertname", "alert"),
                    service=policy.pick(labels, policy.service_labels),
                    environment=policy.pick(labels, policy.environment_labels),
                    severity=policy.severity(labels),
                    source="alertmanager",
                    source_alert={
                        "fingerprint": alert.fingerprint,
                        "startsAt": alert.starts_at.isoformat(),
                        "labels": alert.labels,
                        "annotations": alert.annotations,
                        "generatorURL": alert.generator_url,
                        "groupKey": cmd.group_key,
                        "commonLabels": cmd.common_labels,
                        "externalURL": cmd.external_url,
                    },
                    dedup_key=key,
                    runbook_url=alert.annotations.get("runbook_url", ""),
                )
            )


async def opsgenie_action(cmd: OpsgenieAction, ctx: Context, store: IncidentStore) -> None:
    """OEC actions become transitions of the incident matched by the Opsgenie alertId."""
    alert = cmd.alert
    at = _epoch_ms(alert.updated_at // 1_000_000 if alert.updated_at else alert.created_at)
    actor = alert.username or "opsgenie"
    key = f"opsgenie:{alert.alert_id}"
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        incident = await tx.find_latest(key)
        if cmd.action == "Create":
            if incident is not None and incident.is_open:
                incident.record_occurrence(at=at, actor=actor, message_id=ctx.message_id)
                await tx.update(incident)
            else:
                await tx.add(
                    Incident.open(
                        at=at,
                        actor=actor,
                        message_id=ctx.message_id,
                        title=alert.message or alert.alias or alert.alert_id,
                        severity=normalise_severity(alert.priority),
                        service=alert.details.get("service", alert.entity),
                        environment=alert.details.get("environment", ""),
                        source="opsgenie",
                        source_alert={
                            "alertId": alert.alert_id,
                            "alias": alert.alias,
                            "tags": alert.tags,
                            "integrationName": cmd.integration_name,
                        },
                        dedup_key=key,
                    )
                )
            return
        if incident is None:
            # Its Create may still be in flight (deliveries are not ordered): retry, bounded.
            raise TransientError(f"no incident yet for Opsgenie alert {alert.alert_id} (action {cmd.action})")
        if cmd.action == "Acknowledge":
            incident.acknowledge(at=at, actor=actor, message_id=ctx.message_id, note=alert.note)
        elif cmd.action == "UnAcknowledge":
            incident.unacknowledge(at=at, actor=actor, message_id=ctx.message_id)
        elif cmd.action == "AddNote":
            incident.add_note(note=alert.note, at=at, actor=actor, message_id=ctx.message_id)
        elif cmd.action == "Close":
            incident.resolve(at=at, actor=actor, message_id=ctx.message_id, note=alert.note)
        elif cmd.action in ("AssignOwnership", "TakeOwnership"):
            incident.assign(owner=alert.owner or actor, at=at, actor=actor, message_id=ctx.message_id)
        else:
            incident.record_action(
                action=cmd.action, at=at, actor=actor, message_id=ctx.message_id, note=alert.note
            )
        await tx.update(incident)


_HEALTH_SEVERITY: dict[str, SeverityName] = {
    "issue": "high",
    "scheduledChange": "low",
    "accountNotification": "info",
}


async def aws_event(cmd: AwsEvent, ctx: Context, store: IncidentStore) -> None:
    """AWS Health events open/close per eventArn; Security Hub findings open/resolve per finding Id."""
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        if isinstance(cmd.detail, HealthDetail):
            await _health(cmd, cmd.detail, ctx, tx)
        elif isinstance(cmd.detail, SecurityHubDetail):
            await _findings(cmd, cmd.detail, ctx, tx)


async def _health(cmd: AwsEvent, detail: HealthDetail, ctx: Context, tx: Transaction) -> None:
    key = f"aws.health:{detail.event_arn}"
    incident = await tx.find_open(key)
    if detail.status_code == "closed":
        if incident is not None:
            incident.resolve(at=cmd.time, actor="aws.health", message_id=ctx.message_id)
            await tx.update(incident)
        return
    if incident is not None:
        incident.record_occurrence(at=cmd.time, actor="aws.health", message_id=ctx.message_id)
        await tx.update(incident)
        return
    description = detail.event_description[0].get("latestDescription", "") if detail.event_description else ""
    await tx.add(
        Incident.open(
            at=cmd.time,
            actor="aws.health",
            message_id=ctx.message_id,
            title=f"AWS Health: {detail.event_type_code} ({detail.service}, {cmd.region})",
            service=detail.service,
            environment=cmd.account,
            severity=_HEALTH_SEVERITY.get(detail.event_type_category, "medium"),
            source="aws.health",
            source_alert={
                "eventArn": detail.event_arn,
                "eventTypeCode": detail.event_type_code,
                "statusCode": detail.status_code,
                "region": cmd.region,
                "description": description,
            },
            dedup_key=key,
        )
    )


async def _findings(cmd: AwsEvent, detail: SecurityHubDetail, ctx: Context, tx: Transaction) -> None:
    for finding in detail.findings:
        key = f"aws.securityhub:{finding.id}"
        incident = await tx.find_open(key)
        closed = finding.record_state == "ARCHIVED" or (
            finding.workflow is not None and finding.workflow.status in ("RESOLVED", "SUPPRESSED")
        )
        if closed:
            if incident is not None:
                incident.resolve(at=cmd.time, actor="aws.securityhub", message_id=ctx.message_id)
                await tx.update(incident)
            continue
        if incident is not None:
            incident.record_occurrence(at=cmd.time, actor="aws.securityhub", message_id=ctx.message_id)
            await tx.update(incident)
            continue
        await tx.add(
            Incident.open(
                at=cmd.time,
                actor="aws.securityhub",
                message_id=ctx.message_id,
                title=finding.title,
                service="securityhub",
                environment=finding.aws_account_id or cmd.account,
                severity=normalise_severity(finding.severity.label),
                source="aws.securityhub",
                source_alert={"Id": finding.id, "Severity": finding.severity.label, "region": cmd.region},
                dedup_key=key,
            )
        )


async def create_incident(cmd: CreateIncident, ctx: Context, store: IncidentStore) -> None:
    key = cmd.dedup_key or f"manual:{ctx.idempotency_key}"
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        incident = await tx.find_open(key)
        if incident is not None:
            incident.record_occurrence(at=cmd.at, actor=cmd.actor, message_id=ctx.message_id)
            await tx.update(incident)
            return
        await tx.add(
            Incident.open(
                at=cmd.at,
                actor=cmd.actor,
                message_id=ctx.message_id,
                title=cmd.title,
                service=cmd.service,
                environment=cmd.environment,
                severity=cmd.severity,
                source="manual",
                dedup_key=key,
                runbook_url=cmd.runbook_url,
                source_alert={"description": cmd.description} if cmd.description else {},
            )
        )


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
    incident = await (tx.get(cmd.incident_id) if cmd.incident_id else tx.find_latest(cmd.dedup_key))
    if incident is None:
        # The create may still be in flight (deliveries are not ordered): retry, bounded by max_attempts.
        raise TransientError(f"no incident {cmd.incident_id or cmd.dedup_key!r} (yet)")
    return incident


def _epoch_ms(value: int | None) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC) if value else datetime.now(UTC)


HANDLERS: dict[type[Command], Sequence[Handler]] = {
    AlertmanagerWebhook: [alertmanager_webhook],
    OpsgenieAction: [opsgenie_action],
    AwsEvent: [aws_event],
    CreateIncident: [create_incident],
    AcknowledgeIncident: [acknowledge_incident],
    ResolveIncident: [resolve_incident],
    AddNote: [add_note],
}
