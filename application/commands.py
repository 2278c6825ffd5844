"""One validated model per command type.

The external payloads (Alertmanager, Opsgenie OEC, EventBridge) keep their original field names as
aliases and keep unknown fields (``extra="allow"``): an incident should be able to show the payload
exactly as the source sent it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Command(BaseModel):
    """Base of every command. ``TYPE`` is the value of the message's ``type`` attribute."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    TYPE: ClassVar[str]


class _Payload(BaseModel):
    """A nested part of an external payload: original names, unknown fields kept."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)


# --- Prometheus Alertmanager webhook (version 4) -------------------------------------------------------

AlertStatus = Literal["firing", "resolved"]


class Alert(_Payload):
    status: AlertStatus
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: datetime = Field(alias="startsAt")
    # Alertmanager sends 0001-01-01T00:00:00Z while an alert fires.
    ends_at: datetime | None = Field(default=None, alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str


class AlertmanagerWebhook(Command):
    """A webhook notification exactly as Alertmanager posts it: one group, one or more alerts."""

    TYPE = "alertmanager.webhook"
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    version: Literal["4"]
    group_key: str = Field(alias="groupKey")
    truncated_alerts: int = Field(default=0, alias="truncatedAlerts")
    status: AlertStatus
    receiver: str
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    alerts: list[Alert] = Field(min_length=1)


# --- Opsgenie Edge Connector (OEC) alert action -------------------------------------------------------


class OpsgenieAlert(_Payload):
    alert_id: str = Field(alias="alertId")
    alias: str = ""
    message: str = ""
    tags: list[str] = Field(default_factory=list)
    priority: str = "P3"
    entity: str = ""
    source: str = ""
    description: str = ""
    details: dict[str, str] = Field(default_factory=dict)
    username: str = ""
    note: str = ""
    owner: str = ""
    created_at: int | None = Field(default=None, alias="createdAt")  # epoch milliseconds
    updated_at: int | None = Field(default=None, alias="updatedAt")  # epoch nanoseconds (sic)


class OpsgenieAction(Command):
    """An alert action as Opsgenie's Edge Connector forwards it (Create, Acknowledge, AddNote, Close, ...)."""

    TYPE = "opsgenie.action"
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    action: str = Field(min_length=1)
    alert: OpsgenieAlert
    integration_name: str = Field(default="", alias="integrationName")
    integration_id: str = Field(default="", alias="integrationId")
    source: dict[str, Any] = Field(default_factory=dict)


# --- AWS EventBridge: AWS Health and Security Hub ----------------------------------------------------


class HealthDetail(_Payload):
    event_arn: str = Field(alias="eventArn")
    service: str
    event_type_code: str = Field(alias="eventTypeCode")
    event_type_category: str = Field(default="", alias="eventTypeCategory")
    status_code: str = Field(default="open", alias="statusCode")  # open | closed | upcoming
    start_time: str = Field(default="", alias="startTime")
    end_time: str = Field(default="", alias="endTime")
    event_description: list[dict[str, str]] = Field(default_factory=list, alias="eventDescription")
    affected_entities: list[dict[str, Any]] = Field(default_factory=list, alias="affectedEntities")


class FindingSeverity(_Payload):
    label: str = Field(alias="Label")  # INFORMATIONAL | LOW | MEDIUM | HIGH | CRITICAL


class FindingWorkflow(_Payload):
    status: str = Field(alias="Status")  # NEW | NOTIFIED | RESOLVED | SUPPRESSED


class Finding(_Payload):
    """An ASFF finding; only the fields incidentd reads are typed."""

    id: str = Field(alias="Id")
    title: str = Field(alias="Title")
    description: str = Field(default="", alias="Description")
    aws_account_id: str = Field(default="", alias="AwsAccountId")
    created_at: str = Field(default="", alias="CreatedAt")
    updated_at: str = Field(default="", alias="UpdatedAt")
    severity: FindingSeverity = Field(alias="Severity")
    workflow: FindingWorkflow | None = Field(default=None, alias="Workflow")
    record_state: str = Field(default="ACTIVE", alias="RecordState")
    resources: list[dict[str, Any]] = Field(default_factory=list, alias="Resources")


class SecurityHubDetail(_Payload):
    findings: list[Finding] = Field(min_length=1)


_DETAIL_TYPES: dict[str, tuple[str, type[BaseModel]]] = {
    "aws.health": ("AWS Health Event", HealthDetail),
    "aws.securityhub": ("Security Hub Findings - Imported", SecurityHubDetail),
}


class AwsEvent(Command):
    """An EventBridge event from AWS Health or Security Hub; ``detail`` is typed by ``source``."""

    TYPE = "aws.event"
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    version: str = "0"
    id: str
    detail_type: str = Field(alias="detail-type")
    source: Literal["aws.health", "aws.securityhub"]
    account: str = ""
    time: datetime
    region: str = ""
    resources: list[str] = Field(default_factory=list)
    detail: HealthDetail | SecurityHubDetail

    @model_validator(mode="before")
    @classmethod
    def _detail_by_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("detail"), dict):
            expected = _DETAIL_TYPES.get(data.get("source", ""))
            if expected is not None:
                detail_type, model = expected
                if data.get("detail-type", data.get("detail_type")) != detail_type:
                    raise ValueError(f"detail-type must be {detail_type!r} for source {data['source']!r}")
                data = {**data, "detail": model.model_validate(data["detail"])}
        return data


# --- incidentd's own incident lifecycle commands ------------------------------------------------------

Severity = Literal["critical", "high", "medium", "low", "info"]


def _now() -> datetime:
    return datetime.now(UTC)


class CreateIncident(Command):
    TYPE = "incident.create"

    title: str = Field(min_length=1)
    service: str = ""
    environment: str = ""
    severity: Severity = "medium"
    dedup_key: str = ""
    description: str = ""
    runbook_url: str = ""
    actor: str = "manual"
    at: datetime = Field(default_factory=_now)


class IncidentRef(Command):
    """Names an incident by id, or by dedup key (the open incident with that key)."""

    incident_id: UUID | None = None
    dedup_key: str = ""
    actor: str = "manual"
    at: datetime = Field(default_factory=_now)

    @model_validator(mode="after")
    def _needs_a_reference(self) -> IncidentRef:
        if self.incident_id is None and not self.dedup_key:
            raise ValueError("one of incident_id or dedup_key is required")
        return self


class AcknowledgeIncident(IncidentRef):
    TYPE = "incident.acknowledge"
    note: str = ""


class ResolveIncident(IncidentRef):
    TYPE = "incident.resolve"
    note: str = ""


class AddNote(IncidentRef):
    TYPE = "incident.note"
    note: str = Field(min_length=1)


class AnalyzeIncident(IncidentRef):
    """Ask for an AI analysis of an incident (application/analysis.py; docs/ai.md).

    Published by the worker itself after a commit (``reason`` ``opened`` or ``correlated``) and by
    ``incidents analyze ID`` (``requested``). ``request`` is the idempotency key of the request: a
    redelivered or re-published copy with the same key is analysed once.
    """

    TYPE = "incident.analyze"
    reason: Literal["opened", "correlated", "requested"] = "requested"
    request: str = Field(default="", max_length=200)
    note: str = Field(default="", max_length=2000)  # a question for the model (``incidents analyze --note``)
