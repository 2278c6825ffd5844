"""The OpenAPI 3.1 document of the incident API, served at ``/v1/openapi.json``.

Written out rather than generated: it is the contract. ``tests/api/test_openapi.py`` checks it is a valid
OpenAPI document, that it names exactly the API's routes, and validates the real answers of the running
application against its schemas.
"""

from __future__ import annotations

from typing import Any

from application.incidents import SeverityName, Status

_STATUSES = ["open", "acknowledged", "resolved"]
_SEVERITIES = ["critical", "high", "medium", "low", "info"]
assert tuple(_STATUSES) == Status.__args__ and tuple(_SEVERITIES) == SeverityName.__args__  # type: ignore[attr-defined]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_ERRORS = {
    "400": _problem("A bad query value or body; `detail` names the parameter and the reason"),
    "401": _problem("No valid token"),
    "403": _problem("The token lacks the role (read to read, write to act)"),
    "429": _problem("Over the token's rate limit; see Retry-After"),
}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _action(summary: str, note: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": "Publishes the command for the worker (which applies it); the API never writes the "
        "store. The actor on the timeline is the token's name. An `Idempotency-Key` header makes a "
        "retried request the same message (applied once).",
        "security": [{"bearer": []}, {"basic": []}],
        "parameters": [
            _ID_PARAM,
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"note": {"type": "string", "maxLength": 10000, "description": note}},
                    }
                }
            },
        },
        "responses": {
            "202": _json(_ref("Accepted"), "The broker confirmed the command; the worker applies it"),
            **_ERRORS,
            "404": _problem("No such incident"),
            "503": _problem("The broker did not confirm; nothing was accepted, retry"),
        },
    }


def document() -> dict[str, Any]:
    incident_summary = {
        "type": "object",
        "required": ["id", "title", "status", "severity", "service", "environment", "created_at"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "title": {"type": "string"},
            "status": {"enum": _STATUSES},
            "severity": {"enum": _SEVERITIES},
            "service": {"type": "string"},
            "environment": {"type": "string"},
            "source": {"type": "string"},
            "assignee": {"type": "string"},
            "correlation_group": {"type": "string"},
            "occurrences": {"type": "integer"},
            "created_at": _TIME,
            "acknowledged_at": _NULLABLE_TIME,
            "resolved_at": _NULLABLE_TIME,
            "last_event_at": _TIME,
        },
    }
    timeline_entry = {
        "type": "object",
        "required": ["at", "kind", "actor", "status"],
        "properties": {
            "at": _TIME,
            "kind": {"type": "string", "description": "opened, occurrence, acknowledged, note, ..."},
            "actor": {"type": "string", "description": "who: a token's name, a source, incidentd"},
            "note": {"type": "string"},
            "status": {"enum": _STATUSES},
            "message_id": {"type": "string"},
        },
    }
    incident = {
        "allOf": [
            _ref("IncidentSummary"),
            {
                "type": "object",
                "required": ["timeline", "enrichment", "links", "references", "correlated"],
                "properties": {
                    "timeline": {"type": "array", "items": _ref("TimelineEntry")},  # oldest first
                    "enrichment": {"type": "object", "additionalProperties": {"type": "object"}},
                    "links": {"type": "object", "additionalProperties": {"type": "string"}},
                    "references": {
                        "type": "object",
                        "properties": {
                            "github_issue": {"type": "string"},
                            "runbook": {"type": "string"},
                            "source": {"type": "string", "description": "the alert's generatorURL"},
                        },
                    },
                    "correlated": {"type": "array", "items": _ref("IncidentSummary")},
                    "dedup_key": {"type": "string"},
                    "source_alert": {"type": "object"},
                    "runbook_url": {"type": "string"},
                },
            },
        ]
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "incidentd incident API",
            "version": "1",
            "description": "Read incidents from the store; act on them through the queue (docs/api.md).",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic", "description": "user: the token's name"},
            },
            "schemas": {
                "IncidentSummary": incident_summary,
                "TimelineEntry": timeline_entry,
                "Incident": incident,
                "IncidentPage": {
                    "type": "object",
                    "required": ["items", "next_cursor"],
                    "properties": {
                        "items": {"type": "array", "items": _ref("IncidentSummary")},
                        "next_cursor": {"type": ["string", "null"], "description": "null on the last page"},
                    },
                },
                "Stats": {
                    "type": "object",
                    "required": ["window", "since", "open", "services"],
                    "properties": {
                        "window": {"type": "string"},
                        "since": _TIME,
                        "open": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["service", "severity", "count"],
                                "properties": {
                                    "service": {"type": "string"},
                                    "severity": {"enum": _SEVERITIES},
                                    "count": {"type": "integer", "minimum": 1},
                                },
                            },
                        },
                        "services": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": [
                                    "service",
                                    "incidents",
                                    "acknowledged",
                                    "resolved",
                                    "mtta_seconds",
                                    "mttr_seconds",
                                ],
                                "properties": {
                                    "service": {"type": "string"},
                                    "incidents": {"type": "integer"},
                                    "acknowledged": {"type": "integer"},
                                    "resolved": {"type": "integer"},
                                    "mtta_seconds": {"type": ["number", "null"]},
                                    "mttr_seconds": {"type": ["number", "null"]},
                                },
                            },
                        },
                    },
                },
                "Accepted": {
                    "type": "object",
                    "required": ["status", "type", "message_id", "incident_id"],
                    "properties": {
                        "status": {"const": "accepted"},
                        "type": {"type": "string"},
                        "message_id": {"type": "string"},
                        "incident_id": {"type": "string", "format": "uuid"},
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string", "description": "urn:incidentd:problem:<reason>"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                },
            },
        },
        "security": [{"bearer": []}, {"basic": []}],
        "paths": {
            "/v1/incidents": {
                "get": {
                    "summary": "Incidents, newest first, filtered, one page at a time (keyset)",
                    "parameters": [
                        _query(
                            "status",
                            "comma-separated: open,acknowledged,resolved",
                            {"type": "string", "pattern": "^[a-z,]+$"},
                        ),
                        _query("service", "exact service", {"type": "string", "maxLength": 256}),
                        _query("environment", "exact environment", {"type": "string", "maxLength": 256}),
                        _query("severity", "exact severity", {"enum": _SEVERITIES}),
                        _query(
                            "since",
                            "created at or after: ISO 8601 time, or a duration ago (24h, 7d)",
                            {"type": "string"},
                        ),
                        _query("until", "created before: ISO 8601 or a duration ago", {"type": "string"}),
                        _query("q", "case-insensitive substring of the title", {"type": "string"}),
                        _query(
                            "limit",
                            "page size",
                            {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                        ),
                        _query("cursor", "next_cursor of the previous page", {"type": "string"}),
                    ],
                    "responses": {"200": _json(_ref("IncidentPage"), "One page"), **_ERRORS},
                }
            },
            "/v1/incidents/{id}": {
                "get": {
                    "summary": "One incident: timeline, enrichment, references, correlation group",
                    "parameters": [_ID_PARAM],
                    "responses": {
                        "200": _json(_ref("Incident"), "The incident"),
                        **_ERRORS,
                        "404": _problem("No such incident"),
                    },
                }
            },
            "/v1/incidents/{id}/acknowledge": {"post": _action("Acknowledge", "kept on the timeline")},
            "/v1/incidents/{id}/resolve": {"post": _action("Resolve", "kept on the timeline")},
            "/v1/incidents/{id}/notes": {"post": _action("Add a note", "required: the note's text")},
            "/v1/stats": {
                "get": {
                    "summary": "Open incidents by service and severity; MTTA and MTTR per service",
                    "parameters": [
                        _query(
                            "window",
                            "incidents created in this window (max 366d)",
                            {"type": "string", "pattern": "^[1-9][0-9]{0,5}[mhdw]$", "default": "7d"},
                        ),
                    ],
                    "responses": {"200": _json(_ref("Stats"), "The statistics"), **_ERRORS},
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
                }
            },
        },
    }
