"""/v1/openapi.json: a valid OpenAPI 3.1 document that names exactly the API's routes, and whose schemas
the running application's real answers satisfy."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import jsonschema
from openapi_spec_validator import validate

from infra.web.api import ACTIONS
from tests.api.conftest import NOW, READ_TOKEN, WRITE_TOKEN, Api, bearer, incident, seed


async def document(api: Api) -> dict[str, Any]:
    response = await api.client.get("/v1/openapi.json")
    assert response.status == 200
    return dict(await response.json())


def check(doc: dict[str, Any], schema_name: str, value: Any) -> None:
    """Validate ``value`` against ``#/components/schemas/<schema_name>`` of ``doc`` (JSON Schema 2020-12)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)


INGEST_ROUTES = {"alertmanager", "opsgenie", "events", "commands"}  # documented in docs/ingest.md


async def test_the_document_is_valid_openapi_and_names_every_route(api: Api) -> None:
    """The document validates as OpenAPI, and its paths and methods are exactly the API's routes (the
    ingest's routes have docs/ingest.md; the pages are HTML)."""
    doc = await document(api)
    validate(doc)
    served = set()
    for route in api.client.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/v1/") and route.method != "HEAD" and route.name not in INGEST_ROUTES:
            for action in ACTIONS if "{action}" in path else [""]:
                served.add((route.method.lower(), path.replace("{action}", action)))
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert served == documented


async def test_real_answers_match_the_documented_schemas(api: Api) -> None:
    """A page, an incident, the stats, a 202 and a problem, as the application answers them, validate
    against the document's schemas."""
    doc = await document(api)
    (first, _) = await seed(
        api.store,
        incident(
            "a", acknowledged=timedelta(minutes=1), resolved=timedelta(minutes=3), runbook_url="https://r"
        ),
        incident("b", at=NOW - timedelta(hours=1), severity="critical"),
    )
    page = await (await api.client.get("/v1/incidents?limit=1", headers=bearer(READ_TOKEN))).json()
    check(doc, "IncidentPage", page)
    assert page["next_cursor"]
    one = await (await api.client.get(f"/v1/incidents/{first.id}", headers=bearer(READ_TOKEN))).json()
    check(doc, "Incident", one)
    check(doc, "Stats", await (await api.client.get("/v1/stats", headers=bearer(READ_TOKEN))).json())
    accepted = await api.client.post(
        f"/v1/incidents/{first.id}/notes", json={"note": "n"}, headers=bearer(WRITE_TOKEN)
    )
    assert accepted.status == 202
    check(doc, "Accepted", await accepted.json())
    missing = await api.client.get(f"/v1/incidents/{uuid.uuid4()}", headers=bearer(READ_TOKEN))
    check(doc, "Problem", await missing.json(content_type=None))
