"""AWS Health events and Security Hub findings, as EventBridge delivers them."""

from __future__ import annotations

from datetime import datetime

from application.commands import AwsEvent, Finding, HealthDetail, SecurityHubDetail
from application.dispatcher import Context
from application.handlers.events import LockedIncidents, message_transaction
from application.incidents import IncidentPolicy, SeverityName, normalise_severity
from application.ports import ChangedIncident, IncidentStore

_HEALTH_SEVERITY: dict[str, SeverityName] = {"issue": "high", "scheduledChange": "low",
                                             "accountNotification": "info"}  # fmt: skip


async def aws_event(cmd: AwsEvent, ctx: Context, store: IncidentStore, policy: IncidentPolicy) -> None:
    """AWS Health events open/close per eventArn; Security Hub findings open/resolve per finding Id."""
    if isinstance(cmd.detail, HealthDetail):
        await _health(cmd, cmd.detail, ctx, store, policy)
    elif isinstance(cmd.detail, SecurityHubDetail):
        await _findings(cmd, cmd.detail, ctx, store, policy)


async def _health(
    cmd: AwsEvent, detail: HealthDetail, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    key = f"aws.health:{detail.event_arn}"
    async with message_transaction(store, ctx, [ChangedIncident(key)]) as tx:
        if tx.already_processed:
            return
        incidents = LockedIncidents(tx, ctx, policy)
        await incidents.load([key], [(detail.service, cmd.account)])
        description = (
            detail.event_description[0].get("latestDescription", "") if detail.event_description else ""
        )
        fields = {
            "title": f"AWS Health: {detail.event_type_code} ({detail.service}, {cmd.region})",
            "service": detail.service, "environment": cmd.account,
            "severity": _HEALTH_SEVERITY.get(detail.event_type_category, "medium"),
            "source": "aws.health",
            "source_alert": {"eventArn": detail.event_arn, "eventTypeCode": detail.event_type_code,
                             "eventTypeCategory": detail.event_type_category,
                             "statusCode": detail.status_code, "region": cmd.region,
                             "description": description, "affectedEntities": detail.affected_entities},
        }  # fmt: skip
        if detail.status_code == "closed":
            await incidents.resolve(key, cmd.time, "aws.health", fields)
        else:
            await incidents.fire(key, cmd.time, "aws.health", fields)


async def _findings(
    cmd: AwsEvent, detail: SecurityHubDetail, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    keyed = [(f"aws.securityhub:{f.id}", f) for f in detail.findings]
    async with message_transaction(store, ctx, [ChangedIncident(key) for key, _ in keyed]) as tx:
        if tx.already_processed:
            return
        incidents = LockedIncidents(tx, ctx, policy)
        await incidents.load(
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
                await incidents.resolve(key, at, "aws.securityhub", fields, started=_iso(finding.created_at))
            else:
                await incidents.fire(key, at, "aws.securityhub", fields)


def _finding_closed(finding: Finding) -> bool:
    """Workflow RESOLVED or SUPPRESSED resolves, and so does an ARCHIVED record (the control is gone)."""
    workflow = finding.workflow.status if finding.workflow is not None else ""
    return finding.record_state == "ARCHIVED" or workflow in ("RESOLVED", "SUPPRESSED")


def _iso(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None
