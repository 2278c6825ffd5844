"""The incident: what incidentd makes of events, and the rules that change it.

Every change goes through a method here and appends a :class:`TimelineEntry`, so the timeline is the
incident's full history (who, when, why, and the message that caused it).

Out-of-order safety
-------------------
Deliveries are not ordered, so the status is never "whatever the last message said". Each event
carries its own time (Alertmanager ``startsAt`` / ``endsAt``, OEC ``createdAt`` / ``updatedAt``,
EventBridge ``time``), and the status is *replayed*: the status-changing entries of the timeline are
folded in event-time order (:meth:`Incident._replay`). Whatever order the same events arrive in, the
incident ends in the same status - the one the latest event implies:

* a firing that is older than (or as old as) the resolution does not reopen;
* an acknowledgement older than the resolution, or older than a later un-acknowledgement, changes
  nothing;
* a resolution that arrives late, older than firings already recorded, leaves the incident open:
  those firings say the problem came back.

A firing *newer* than the resolution of the latest incident with its dedup key opens a **new**
incident (:meth:`Incident.successor`), not a reopening: a recurrence hours later is a new page with
its own times, acknowledgement and metrics. The successor remembers the resolution it follows
(``follows``); events at or before that time belong to the predecessor and are recorded without effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID, uuid4

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Status = Literal["open", "acknowledged", "resolved"]
Source = Literal["alertmanager", "opsgenie", "aws.health", "aws.securityhub", "manual"]
SeverityName = Literal["critical", "high", "medium", "low", "info"]

# Timeline kinds that change the status, and their order when two events carry the same time: a
# resolution at the same instant as a firing wins (an event exactly at the resolution counts as before it).
_STATUS_KINDS = {"opened": 0, "occurrence": 0, "acknowledged": 1, "unacknowledged": 2, "resolved": 3}
_FIRING = ("opened", "occurrence")


def utc(value: datetime) -> datetime:
    """The entity keeps every time in UTC, so times always compare (and the stores' text columns sort).

    Commands carry aware UTC times only (application/commands.py refuses naive ones); a naive time here
    can only come from a document stored before that rule, and is read as the UTC it was meant as.
    """
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcTime = Annotated[datetime, AfterValidator(utc)]


class TimelineEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: UtcTime
    # opened | occurrence | acknowledged | unacknowledged | resolved (these replay into the status)
    # assigned | note | action (recorded only)
    # enriched | action by "incidentd" (facts: what incidentd found out or did; see record_fact)
    kind: str
    actor: str = ""
    note: str = ""
    status: Status  # the incident's status once this entry was recorded
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
    created_at: UtcTime
    acknowledged_at: UtcTime | None = None
    resolved_at: UtcTime | None = None
    last_event_at: UtcTime
    # Set on a successor: the resolution time of the incident it follows (see the module docstring).
    follows: UtcTime | None = None
    predecessor: UUID | None = None
    links: dict[str, str] = Field(default_factory=dict)  # e.g. {"github_issue": "42"}
    # What adapters found out about the incident, by source, e.g. {"kubernetes": {"ready_replicas": 2, ...,
    # "summary": "Deployment shop/checkout: 2/3 ready, ..."}}; see application/side_effects.py.
    enrichment: dict[str, dict[str, Any]] = Field(default_factory=dict)
    timeline: list[TimelineEntry] = Field(default_factory=list)

    @classmethod
    def open(cls, *, at: datetime, actor: str, message_id: str, note: str = "", **fields: Any) -> Incident:
        incident = cls(created_at=at, last_event_at=at, **fields)
        incident._record(at, "opened", actor, message_id, note)
        return incident

    @classmethod
    def already_resolved(
        cls, *, started: datetime | None, at: datetime, actor: str, message_id: str, **fields: Any
    ) -> Incident:
        """An incident whose resolution arrives before (or instead of) its firing.

        Kept, not skipped: the firing may still be in flight, and this record is what stops it from
        opening an incident that is already over.
        """
        at = utc(at)
        start = min(utc(started), at) if started else at
        incident = cls.open(at=start, actor=actor, message_id=message_id, **fields)
        incident.resolve(at=at, actor=actor, message_id=message_id)
        return incident

    def successor(self, *, at: datetime, actor: str, message_id: str, **fields: Any) -> Incident:
        """The new incident a firing newer than this (resolved) incident's resolution opens.

        Acknowledgements that arrived early, newer than the resolution, move along: they belong to
        the new episode.
        """
        assert self.resolved_at is not None
        follows = self.resolved_at
        new = Incident.open(
            at=at, actor=actor, message_id=message_id, follows=follows, predecessor=self.id, **fields
        )
        early = [e for e in self.timeline if e.at > follows and e.kind in ("acknowledged", "unacknowledged")]
        if early:
            new.timeline.extend(early)
            new._replay()
        return new

    @property
    def is_open(self) -> bool:
        return self.status != "resolved"

    def starts_new_episode(self, at: datetime) -> bool:
        """True when a firing at ``at`` must open a successor rather than count on this incident."""
        return self.status == "resolved" and self.resolved_at is not None and utc(at) > self.resolved_at

    def record_occurrence(self, *, at: datetime, actor: str, message_id: str, note: str = "") -> None:
        """The same problem fired again (dedup): count it; it reopens only a resolution older than it."""
        self.occurrences += 1
        self._record(at, "occurrence", actor, message_id, note)

    def acknowledge(self, *, at: datetime, actor: str, message_id: str, note: str = "") -> None:
        self._record(at, "acknowledged", actor, message_id, note)

    def unacknowledge(self, *, at: datetime, actor: str, message_id: str, note: str = "") -> None:
        self._record(at, "unacknowledged", actor, message_id, note)

    def resolve(self, *, at: datetime, actor: str, message_id: str, note: str = "") -> None:
        self._record(at, "resolved", actor, message_id, note)

    def assign(self, *, owner: str, at: datetime, actor: str, message_id: str) -> None:
        self.assignee = owner
        self._record(at, "assigned", actor, message_id, owner)

    def add_note(self, *, note: str, at: datetime, actor: str, message_id: str) -> None:
        self._record(at, "note", actor, message_id, note)

    def record_action(
        self, *, action: str, at: datetime, actor: str, message_id: str, note: str = ""
    ) -> None:
        """An action incidentd has no transition for (e.g. an OEC custom action): kept on the timeline."""
        self._record(at, "action", actor, message_id, f"{action}: {note}" if note else action)

    def record_fact(self, *, kind: str, actor: str, note: str, at: datetime, message_id: str) -> None:
        """What incidentd found out (``enriched``) or did (an action result): on the timeline, but not an
        event - it moves neither the status nor ``last_event_at``, which correlation windows use."""
        self.timeline.append(
            TimelineEntry(at=at, kind=kind, actor=actor, note=note, status=self.status, message_id=message_id)
        )

    def enrich(self, source: str, facts: dict[str, Any], *, at: datetime, message_id: str) -> None:
        """Keep the latest ``facts`` from ``source``; the timeline gets their ``summary`` when it changed."""
        before = self.enrichment.get(source, {}).get("summary")
        self.enrichment[source] = facts
        if facts.get("summary") != before:
            self.record_fact(
                kind="enriched",
                actor=source,
                note=str(facts.get("summary", "")),
                at=at,
                message_id=message_id,
            )

    def _record(self, at: datetime, kind: str, actor: str, message_id: str, note: str = "") -> None:
        at = utc(at)
        self.last_event_at = max(self.last_event_at, at)
        entry = TimelineEntry(
            at=at, kind=kind, actor=actor, note=note, status=self.status, message_id=message_id
        )
        self.timeline.append(entry)
        if kind in _STATUS_KINDS:
            self._replay()
            self.timeline[-1] = entry.model_copy(update={"status": self.status})

    def _replay(self) -> None:
        """Fold the status-changing entries in event-time order; the arrival order does not matter."""
        entries = sorted(
            (e for e in self.timeline
             if e.kind in _STATUS_KINDS and (self.follows is None or e.at > self.follows)),
            key=lambda e: (e.at, _STATUS_KINDS[e.kind]),
        )  # fmt: skip
        status: Status | None = None
        acknowledged_at: datetime | None = None
        resolved_at: datetime | None = None
        for entry in entries:
            if entry.kind in _FIRING:
                if status in (None, "resolved"):
                    status, acknowledged_at, resolved_at = "open", None, None
            elif entry.kind == "resolved":
                status, resolved_at = "resolved", entry.at
            elif entry.kind == "acknowledged" and status == "open":
                status, acknowledged_at = "acknowledged", entry.at
            elif entry.kind == "unacknowledged" and status == "acknowledged":
                status, acknowledged_at = "open", None
        if status is not None:
            self.status, self.acknowledged_at, self.resolved_at = status, acknowledged_at, resolved_at


@dataclass(frozen=True, slots=True)
class OpenGroup:
    """A correlation group that has unresolved incidents, as a store summarises it (no documents read)."""

    name: str
    service: str
    environment: str
    first_opened: datetime
    last_event_at: datetime

    @classmethod
    def started_by(cls, incident: Incident) -> OpenGroup:
        i = incident
        return cls(i.correlation_group, i.service, i.environment, i.created_at, i.last_event_at)

    def joined_by(self, incident: Incident) -> OpenGroup:
        first, last = (
            min(self.first_opened, incident.created_at),
            max(self.last_event_at, incident.last_event_at),
        )
        return OpenGroup(self.name, self.service, self.environment, first, last)


def correlation_group(incident: Incident, groups: Iterable[OpenGroup], window: timedelta) -> str:
    """The correlation group a newly opened incident joins.

    A group of the same service and environment whose incidents' events reach within ``window`` of
    this incident's start (last event no earlier than start - window, first opening no later than
    start + window) is joined - the oldest such group if several; otherwise the incident starts a group
    of its own, named after its id. Incidents without a service are not correlated.
    """
    if not incident.service:
        return str(incident.id)
    start = utc(incident.created_at)
    try:
        earliest, latest = start - window, start + window
    except OverflowError:  # commands keep times within years of now; a window of centuries is no window
        earliest, latest = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    related = [
        group for group in groups
        if (group.service, group.environment) == (incident.service, incident.environment)
        and utc(group.last_event_at) >= earliest and utc(group.first_opened) <= latest
    ]  # fmt: skip
    if not related:
        return str(incident.id)
    return min(related, key=lambda group: utc(group.first_opened)).name


class IncidentPolicy(BaseModel):
    """How events map onto incidents; built from settings by the container."""

    model_config = ConfigDict(frozen=True)

    service_labels: tuple[str, ...] = ("service", "job")
    environment_labels: tuple[str, ...] = ("environment", "env")
    severity_label: str = "severity"
    correlation_window: float = 300.0  # seconds
    # Labels (OEC: alert details) naming the Kubernetes Namespace and Deployment an alert is about.
    namespace_labels: tuple[str, ...] = ("namespace",)
    deployment_labels: tuple[str, ...] = ("deployment",)

    def pick(self, labels: Mapping[str, str], names: tuple[str, ...]) -> str:
        return next((labels[n] for n in names if labels.get(n)), "")

    def workload(self, labels: Mapping[str, str]) -> tuple[str, str] | None:
        """The (namespace, deployment) the labels name, or None unless they name both."""
        namespace, name = self.pick(labels, self.namespace_labels), self.pick(labels, self.deployment_labels)
        return (namespace, name) if namespace and name else None

    def severity(self, labels: dict[str, str]) -> SeverityName:
        return normalise_severity(labels.get(self.severity_label, ""))

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.correlation_window)


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
