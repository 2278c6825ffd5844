"""The incident: what incidentd makes of events, and the transitions that change it.

Every change goes through a method here and appends a :class:`TimelineEntry`, so the timeline is the
incident's full history (who, when, why, and the message that caused it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["open", "acknowledged", "resolved"]
Source = Literal["alertmanager", "opsgenie", "aws.health", "aws.securityhub", "manual"]
SeverityName = Literal["critical", "high", "medium", "low", "info"]


class TimelineEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: datetime
    kind: str  # opened | occurrence | acknowledged | unacknowledged | assigned | note | resolved | action
    actor: str = ""
    note: str = ""
    status: Status
    message_id: str = ""


class Incident(BaseModel):
    model_config = ConfigDict(validate_assignment=False)

    id: UUID = Field(default_factory=uuid4)
    title: str
    service: str = ""
    environment: str = ""
    severity: SeverityName = "medium"
    status: Status = "open"
    assignee: str = ""
    source: Source
    source_alert: dict[str, Any] = Field(default_factory=dict)
    dedup_key: str
    correlation_group: str = ""
    runbook_url: str = ""
    occurrences: int = 1
    created_at: datetime
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None
    last_event_at: datetime
    links: dict[str, str] = Field(default_factory=dict)  # e.g. {"github_issue": "42"}
    timeline: list[TimelineEntry] = Field(default_factory=list)

    @classmethod
    def open(cls, *, at: datetime, actor: str, message_id: str, **fields: Any) -> Incident:
        incident = cls(created_at=at, last_event_at=at, **fields)
        incident._record(at, "opened", actor, message_id)
        return incident

    @property
    def is_open(self) -> bool:
        return self.status != "resolved"

    def record_occurrence(self, *, at: datetime, actor: str, message_id: str) -> None:
        self.occurrences += 1
        self._record(at, "occurrence", actor, message_id)

    def acknowledge(self, *, at: datetime, actor: str, message_id: str, note: str = "") -> None:
        if self.status == "open":
            self.status = "acknowledged"
            self.acknowledged_at = at
            self._record(at, "acknowledged", actor, message_id, note)

    def unacknowledge(self, *, at: datetime, actor: str, message_id: str) -> None:
        if self.status == "acknowledged":
            self.status = "open"
            self.acknowledged_at = None
            self._record(at, "unacknowledged", actor, message_id)

    def assign(self, *, owner: str, at: datetime, actor: str, message_id: str) -> None:
        self.assignee = owner
        self._record(at, "assigned", actor, message_id, owner)

    def add_note(self, *, note: str, at: datetime, actor: str, message_id: str) -> None:
        self._record(at, "note", actor, message_id, note)

    def record_action(
        self, *, action: str, at: datetime, actor: str, message_id: str, note: str = ""
    ) -> None:
        self._record(at, "action", actor, message_id, f"{action}: {note}" if note else action)

    def resolve(self, *, at: datetime, actor: str, message_id: str, note: str = "") -> None:
        if self.status != "resolved":
            self.status = "resolved"
            self.resolved_at = at
            self._record(at, "resolved", actor, message_id, note)

    def _record(self, at: datetime, kind: str, actor: str, message_id: str, note: str = "") -> None:
        self.last_event_at = max(self.last_event_at, at)
        self.timeline.append(
            TimelineEntry(at=at, kind=kind, actor=actor, note=note, status=self.status, message_id=message_id)
        )


class IncidentPolicy(BaseModel):
    """How events map onto incidents; built from settings by the container."""

    model_config = ConfigDict(frozen=True)

    service_labels: tuple[str, ...] = ("service", "job")
    environment_labels: tuple[str, ...] = ("environment", "env")
    severity_label: str = "severity"

    def pick(self, labels: dict[str, str], names: tuple[str, ...]) -> str:
        return next((labels[n] for n in names if labels.get(n)), "")

    def severity(self, labels: dict[str, str]) -> SeverityName:
        return normalise_severity(labels.get(self.severity_label, ""))


_SEVERITY_WORDS: dict[str, SeverityName] = {
    "critical": "critical",
    "crit": "critical",
    "page": "critical",
    "p1": "critical",
    "fatal": "critical",
    "high": "high",
    "error": "high",
    "major": "high",
    "p2": "high",
    "medium": "medium",
    "warning": "medium",
    "warn": "medium",
    "p3": "medium",
    "moderate": "medium",
    "low": "low",
    "minor": "low",
    "p4": "low",
    "info": "info",
    "informational": "info",
    "none": "info",
    "p5": "info",
}


def normalise_severity(word: str, default: SeverityName = "medium") -> SeverityName:
    """Map the many spellings sources use (Alertmanager labels, OEC P1-P5, ASFF labels) to ours."""
    return _SEVERITY_WORDS.get(word.strip().lower(), default)
