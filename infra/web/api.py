"""The incident API: read the store, act through the queue (docs/api.md).

``GET /v1/incidents`` (filters, keyset pagination), ``GET /v1/incidents/{id}`` (timeline, enrichment,
links, correlation group), ``GET /v1/stats?window=7d`` read the store through
:class:`application.ports.IncidentReader`. ``POST /v1/incidents/{id}/acknowledge|resolve|notes`` never
touch it: they publish the command, as ``app.py incidents ack`` does, and answer 202 with the message id
once the broker confirmed it; the worker applies it (one writer). The actor on the timeline is the
token's name. Every query value is validated; a bad one is a 400 naming the parameter and the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, get_args
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from application.commands import AcknowledgeIncident, AddNote, ResolveIncident
from application.errors import DecodeError
from application.incidents import Incident, SeverityName, Status
from application.messages import TYPE_ATTR, Message
from application.ports import IncidentQuery, IncidentReader
from infra.web.app import DEPS, MESSAGE_ID, HttpDeps, Problem, principal, requires
from infra.web.ingest import SENDER_ATTR, publish, read_body, stable_id

routes = web.RouteTableDef()

MAX_LIMIT = 200
MAX_NOTE = 10_000
STATUSES: tuple[Status, ...] = get_args(Status)
SEVERITIES: tuple[SeverityName, ...] = get_args(SeverityName)
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_WINDOW = timedelta(days=366)


def duration(text: str) -> timedelta:
    """``30m``, ``24h``, ``7d``, ``2w`` as a timedelta; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("expected a duration such as 30m, 24h, 7d or 2w")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def instant(text: str) -> datetime:
    """An ISO 8601 time (no offset: UTC) or a duration before now (``24h``: 24 hours ago)."""
    try:
        return datetime.now(UTC) - duration(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("expected an ISO 8601 time (2026-12-03T10:00:00Z) or a duration (24h)") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class ListParams(BaseModel):
    """The query of ``GET /v1/incidents`` (and of the dashboard's pages)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: tuple[Status, ...] = ()
    service: str | None = Field(default=None, min_length=1, max_length=256)
    environment: str | None = Field(default=None, min_length=1, max_length=256)
    severity: SeverityName | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = Field(default=None, min_length=1, max_length=256)
    limit: int = Field(default=50, ge=1, le=MAX_LIMIT)
    cursor: tuple[datetime, UUID] | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _statuses(cls, value: Any) -> Any:
        return tuple(s.strip() for s in value.split(",")) if isinstance(value, str) else value

    @field_validator("since", "until", mode="before")
    @classmethod
    def _instant(cls, value: Any) -> Any:
        return instant(value) if isinstance(value, str) else value

    @field_validator("cursor", mode="before")
    @classmethod
    def _cursor(cls, value: Any) -> Any:
        return decode_cursor(value) if isinstance(value, str) else value

    def query(self) -> IncidentQuery:
        # One more than asked for: tells whether there is a next page without a count.
        return IncidentQuery(
            statuses=self.status, service=self.service, environment=self.environment,
            severity=self.severity, since=self.since, until=self.until, title=self.q,
            limit=self.limit + 1, after=self.cursor,
        )  # fmt: skip


def encode_cursor(incident: Incident) -> str:
    raw = json.dumps([incident.created_at.isoformat(), str(incident.id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, UUID]:
    try:
        at, last = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return datetime.fromisoformat(at), UUID(last)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValueError("not a cursor this API returned (use next_cursor as it is)") from None


def parse_params(model: type[BaseModel], request: web.Request) -> Any:
    """Validate the query string with ``model``; 400 naming each bad parameter and why."""
    values: dict[str, str] = {}
    for key in request.query:
        found = request.query.getall(key)
        if len(found) > 1:
            raise Problem(400, "invalid-query", f"{key}: given {len(found)} times; give it once")
        if found[0] != "":  # an empty form field means "no filter"
            values[key] = found[0]
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise Problem(400, "invalid-query", validation_reason(exc)) from None


def validation_reason(exc: ValidationError, unknown: str = "unknown parameter") -> str:
    reasons = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"][:1]) or "query"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = unknown
        reasons.append(f"{where}: {message}")
    return "; ".join(reasons)


def reader(request: web.Request) -> IncidentReader:
    store = request.app[DEPS].store
    assert store is not None  # the API's routes are added only with a store (make_app)
    return store


def incident_id(request: web.Request) -> UUID:
    raw = request.match_info["id"]
    try:
        return UUID(raw)
    except ValueError:
        raise Problem(400, "invalid-query", f"id: {raw[:64]!r} is not an incident id (a UUID)") from None


async def find(request: web.Request) -> Incident:
    wanted = incident_id(request)
    incident = await reader(request).get(wanted)
    if incident is None:
        raise Problem(404, "unknown-incident", f"no incident {wanted}")
    return incident


# --- reading ----------------------------------------------------------------------------------------


def summary(incident: Incident) -> dict[str, Any]:
    """An incident in a list: what a row shows, no timeline."""
    return incident.model_dump(
        mode="json",
        include={
            "id",
            "title",
            "status",
            "severity",
            "service",
            "environment",
            "source",
            "assignee",
            "correlation_group",
            "occurrences",
            "created_at",
            "acknowledged_at",
            "resolved_at",
            "last_event_at",
        },
    )


def references(incident: Incident) -> dict[str, str]:
    """Where to read more: the GitHub issue, the runbook, the alert's source (Prometheus expression)."""
    found = {
        "github_issue": incident.links.get("github_issue_url", ""),
        "runbook": incident.runbook_url,
        "source": str(incident.source_alert.get("generatorURL", "") or ""),
    }
    return {name: url for name, url in found.items() if url}


async def page(store: IncidentReader, params: ListParams) -> tuple[list[Incident], str | None]:
    found = await store.search(params.query())
    items = found[: params.limit]
    more = len(found) > params.limit
    return items, encode_cursor(items[-1]) if more and items else None


@routes.get("/v1/incidents", name="incidents")
@requires("read")
async def list_incidents(request: web.Request) -> web.Response:
    """Incidents newest first, filtered; ``next_cursor`` null on the last page."""
    params = parse_params(ListParams, request)
    items, cursor = await page(reader(request), params)
    return web.json_response({"items": [summary(i) for i in items], "next_cursor": cursor})


async def detail(store: IncidentReader, incident: Incident) -> dict[str, Any]:
    """The whole incident, its references and the other incidents of its correlation group."""
    doc = incident.model_dump(mode="json")
    doc["timeline"] = sorted(doc["timeline"], key=lambda entry: entry["at"])
    doc["references"] = references(incident)
    group = await store.search(IncidentQuery(correlation_group=incident.correlation_group, limit=51))
    doc["correlated"] = [summary(i) for i in group if i.id != incident.id][:50]
    return doc


@routes.get("/v1/incidents/{id}", name="incident")
@requires("read")
async def get_incident(request: web.Request) -> web.Response:
    """One incident with its timeline (oldest first), enrichment facts, references and group."""
    return web.json_response(await detail(reader(request), await find(request)))


class StatsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window: str = "7d"

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        if duration(value) > MAX_WINDOW:
            raise ValueError("at most 366d")
        return value


async def stats(store: IncidentReader, window: str) -> dict[str, Any]:
    since = datetime.now(UTC) - duration(window)
    active = await store.count_active()
    services = await store.service_stats(since)
    by_service = sorted((service, severity, count) for (severity, service), count in active.items())
    return {
        "window": window,
        "since": since.isoformat(),
        "open": [{"service": svc, "severity": sev, "count": n} for svc, sev, n in by_service],
        "services": [asdict(s) for s in services],
    }


@routes.get("/v1/stats", name="stats")
@requires("read")
async def get_stats(request: web.Request) -> web.Response:
    """Unresolved incidents by service x severity; per service, incidents created in the window,
    MTTA, MTTR."""
    params = parse_params(StatsParams, request)
    return web.json_response(await stats(reader(request), params.window))


# --- acting: publish, never write -------------------------------------------------------------------


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    note: str = Field(default="", max_length=MAX_NOTE)


ACTIONS = {"acknowledge": AcknowledgeIncident.TYPE, "resolve": ResolveIncident.TYPE, "notes": AddNote.TYPE}


async def act(request: web.Request, incident: Incident, action: str, note: str, key: str | None) -> str:
    """Publish ``action`` on ``incident`` for the worker, as the caller (the actor on the timeline); the
    message id once the broker confirmed. ``key``: the caller's idempotency key (the same key, the same
    message id: a retried request is applied once); without one, every request is a new command."""
    deps: HttpDeps = request.app[DEPS]
    type_name = ACTIONS[action]
    actor = principal(request).name
    body = json.dumps({"incident_id": str(incident.id), "note": note, "actor": actor,
                       "at": datetime.now(UTC).isoformat()}).encode()  # fmt: skip
    try:
        deps.factory.decode(Message(body, {TYPE_ATTR: type_name}))
    except DecodeError as exc:
        raise Problem(400, "invalid-body", str(exc)) from None
    message_id = stable_id(f"{request.path}\n{actor}", key.encode()) if key else f"api-{uuid.uuid4().hex}"
    request[MESSAGE_ID] = message_id
    await publish(request, deps, body, {TYPE_ATTR: type_name, SENDER_ATTR: actor}, message_id)
    return message_id


@routes.post("/v1/incidents/{id}/{action:acknowledge|resolve|notes}", name="incident-action")
@requires("write")
async def post_action(request: web.Request) -> web.Response:
    """Acknowledge / resolve / add a note: published for the worker, 202 with the message id."""
    incident = await find(request)
    action = request.match_info["action"]
    raw = await read_body(request, request.app[DEPS])
    try:
        body = ActionBody.model_validate_json(raw) if raw.strip() else ActionBody()
    except ValidationError as exc:
        raise Problem(400, "invalid-body", validation_reason(exc, "unknown field")) from None
    if action == "notes" and not body.note.strip():
        raise Problem(400, "invalid-body", "note: a note needs some text")
    message_id = await act(request, incident, action, body.note, request.headers.get("Idempotency-Key"))
    answer = {"status": "accepted", "type": ACTIONS[action], "message_id": message_id,
              "incident_id": str(incident.id)}  # fmt: skip
    return web.json_response(answer, status=202)


@routes.get("/v1/openapi.json", name="openapi")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of the incident API (no token needed to read it)."""
    from infra.web.openapi import document

    return web.json_response(document())
