"""GET /v1/incidents, /v1/incidents/{id} and /v1/stats on both stores, over HTTP."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import (
    INGEST_TOKEN,
    NOW,
    READ_TOKEN,
    WRITE_TOKEN,
    Api,
    bearer,
    incident,
    seed,
    serving,
)


async def get(api: Api, path: str, token: str = READ_TOKEN) -> tuple[int, Any]:
    response = await api.client.get(path, headers=bearer(token))
    return response.status, await response.json(content_type=None)


async def titles(api: Api, query: str) -> list[str]:
    status, body = await get(api, f"/v1/incidents?{query}")
    assert status == 200, body
    return [item["title"] for item in body["items"]]


async def test_list_is_newest_first_with_the_fields_a_row_needs(api: Api) -> None:
    """Incidents come newest first, each with id, title, status, severity, service, environment and
    created_at."""
    await seed(api.store, incident("old", at=NOW - timedelta(hours=2)), incident("new", at=NOW),
               incident("middle", at=NOW - timedelta(hours=1)))  # fmt: skip
    status, body = await get(api, "/v1/incidents")
    assert status == 200
    assert [i["title"] for i in body["items"]] == ["new", "middle", "old"]
    assert body["next_cursor"] is None
    first = body["items"][0]
    assert {"id", "title", "status", "severity", "service", "environment", "created_at"} <= first.keys()
    assert "timeline" not in first


async def test_filters_each_narrow_the_list(api: Api) -> None:
    """status (one or several), service, environment, severity, since / until and title text each filter."""
    await seed(
        api.store,
        incident("db down", service="db", severity="critical", at=NOW - timedelta(days=3)),
        incident("cart slow", service="cart", environment="staging", severity="low",
                 acknowledged=timedelta(minutes=1)),
        incident("cart errors 100%_done", service="cart", resolved=timedelta(minutes=5),
                 at=NOW - timedelta(hours=1)),
    )  # fmt: skip
    assert await titles(api, "status=open") == ["db down"]
    assert await titles(api, "status=acknowledged,resolved") == ["cart slow", "cart errors 100%_done"]
    assert await titles(api, "service=cart") == ["cart slow", "cart errors 100%_done"]
    assert await titles(api, "environment=staging") == ["cart slow"]
    assert await titles(api, "severity=critical") == ["db down"]
    assert await titles(api, "since=2d") == ["cart slow", "cart errors 100%_done"]
    until = (NOW - timedelta(minutes=30)).isoformat()
    assert await titles(api, f"until={until.replace('+', '%2B')}") == ["cart errors 100%_done", "db down"]
    assert await titles(api, "q=CART") == ["cart slow", "cart errors 100%_done"]
    assert await titles(api, "q=100%25_") == ["cart errors 100%_done"]  # % and _ match themselves
    assert await titles(api, "q=0%25") == ["cart errors 100%_done"]
    assert await titles(api, "q=1_0") == []
    assert await titles(api, "service=cart&status=open") == []
    assert await titles(api, "service=") == [
        "cart slow",
        "cart errors 100%_done",
        "db down",
    ]  # empty: no filter


async def test_order_is_by_instant_whatever_the_offset(api: Api) -> None:
    """An incident stamped 10:30+02:00 (08:30 UTC) is older than one at 09:00Z, and ``since`` compares
    instants: the order is not the text of the timestamps."""
    plus_two = timezone(timedelta(hours=2))
    day = datetime(2026, 11, 20, tzinfo=UTC)
    await seed(
        api.store,
        incident("at 09:00Z", at=day.replace(hour=9)),
        incident("at 10:30+02:00", at=datetime(2026, 11, 20, 10, 30, tzinfo=plus_two)),
        incident("at 08:00Z", at=day.replace(hour=8)),
    )
    assert await titles(api, "") == ["at 09:00Z", "at 10:30+02:00", "at 08:00Z"]
    assert await titles(api, "since=2026-11-20T08:45:00Z") == ["at 09:00Z"]
    assert await titles(api, "limit=1&" + "since=2026-11-20T08:15:00") == ["at 09:00Z"]  # no offset: UTC


async def test_pages_with_inserts_in_between_repeat_and_skip_nothing(api: Api) -> None:
    """Walking the pages with ``next_cursor`` while incidents are added (newer ones, older ones, and ones
    with the very same created_at as a page's last) yields every incident that existed exactly once."""
    same = NOW - timedelta(minutes=30)
    existing = await seed(api.store, *(
        incident(f"existing {n}", at=same if n % 3 == 0 else NOW - timedelta(minutes=n)) for n in range(40)
    ))  # fmt: skip
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "limit=7" + (f"&cursor={cursor}" if cursor else "")
        status, body = await get(api, f"/v1/incidents?{query}")
        assert status == 200, body
        assert len(body["items"]) <= 7
        seen += [item["id"] for item in body["items"]]
        pages += 1
        # Between pages: one newer than everything, one older than everything, one tied with the page's end.
        newer = incident(f"new {pages}", at=NOW + timedelta(minutes=pages))
        older = incident(f"older {pages}", at=NOW - timedelta(days=pages))
        await seed(api.store, newer, older, incident(f"tie {pages}", at=same))
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "an incident was listed twice"
    assert {str(i.id) for i in existing} <= set(seen), "an incident that existed was skipped"
    assert pages >= 6


async def test_a_page_is_exactly_full_and_the_last_has_no_cursor(api: Api) -> None:
    """With 6 incidents and limit=3: two full pages, the second without next_cursor (no empty third page)."""
    await seed(api.store, *(incident(f"n{n}", at=NOW - timedelta(minutes=n)) for n in range(6)))
    _, first = await get(api, "/v1/incidents?limit=3")
    assert [i["title"] for i in first["items"]] == ["n0", "n1", "n2"] and first["next_cursor"]
    _, second = await get(api, f"/v1/incidents?limit=3&cursor={first['next_cursor']}")
    assert [i["title"] for i in second["items"]] == ["n3", "n4", "n5"]
    assert second["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("status=closed", "status: Input should be 'open', 'acknowledged' or 'resolved'"),
        ("severity=urgent", "severity: Input should be 'critical', 'high', 'medium', 'low' or 'info'"),
        ("limit=0", "limit: Input should be greater than or equal to 1"),
        ("limit=201", "limit: Input should be less than or equal to 200"),
        ("limit=ten", "limit: Input should be a valid integer"),
        ("since=yesterday", "since: expected an ISO 8601 time (2026-12-03T10:00:00Z) or a duration (24h)"),
        ("until=2026-13-01", "until: expected an ISO 8601 time"),
        ("cursor=not-a-cursor", "cursor: not a cursor this API returned"),
        ("cursor=WyJ4Il0", "cursor: not a cursor this API returned"),
        ("servce=cart", "servce: unknown parameter"),
        ("service=a&service=b", "service: given 2 times; give it once"),
        ("q=" + "x" * 300, "q: String should have at most 256 characters"),
    ],
)
async def test_a_bad_query_value_is_a_400_naming_it(api: Api, query: str, reason: str) -> None:
    """Every bad value is refused with a problem+json 400 whose detail names the parameter and why."""
    response = await api.client.get(f"/v1/incidents?{query}", headers=bearer(READ_TOKEN))
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    problem = await response.json(content_type=None)
    assert problem["type"] == "urn:incidentd:problem:invalid-query"
    assert reason in problem["detail"]


async def test_detail_has_the_timeline_references_and_the_correlation_group(api: Api) -> None:
    """GET /v1/incidents/{id}: the whole incident, its timeline oldest first with actors, the links
    (GitHub issue, runbook, the alert's source) and the other incidents of its correlation group."""
    first = incident("api down", acknowledged=timedelta(minutes=2), resolved=timedelta(minutes=9),
                     runbook_url="https://runbooks.example/api", group="g-1",
                     source_alert={"generatorURL": "http://prometheus.example/graph?g0.expr=up"},
                     links={"github_issue": "7", "github_issue_url": "https://github.com/o/r/issues/7"},
                     enrichment={"kubernetes": {"summary": "Deployment shop/api: 1/3 ready"}})  # fmt: skip
    second = incident("api latency", at=NOW - timedelta(minutes=1), group="g-1")
    await seed(api.store, first, second, incident("elsewhere", group="g-2"))
    status, doc = await get(api, f"/v1/incidents/{first.id}")
    assert status == 200
    assert doc["status"] == "resolved"
    assert [(e["kind"], e["actor"]) for e in doc["timeline"]] == [
        ("opened", "test"), ("acknowledged", "someone"), ("resolved", "someone")
    ]  # fmt: skip
    assert doc["references"] == {
        "github_issue": "https://github.com/o/r/issues/7",
        "runbook": "https://runbooks.example/api",
        "source": "http://prometheus.example/graph?g0.expr=up",
    }
    assert doc["enrichment"]["kubernetes"]["summary"] == "Deployment shop/api: 1/3 ready"
    assert [i["title"] for i in doc["correlated"]] == ["api latency"]


async def test_unknown_id_is_404_and_a_malformed_one_400(api: Api) -> None:
    """An id no incident has is a 404; something that is not an id at all is a 400 saying so."""
    response = await api.client.get(f"/v1/incidents/{uuid.uuid4()}", headers=bearer(READ_TOKEN))
    assert response.status == 404
    assert (await response.json(content_type=None))["type"] == "urn:incidentd:problem:unknown-incident"
    response = await api.client.get("/v1/incidents/42", headers=bearer(READ_TOKEN))
    assert response.status == 400
    assert "is not an incident id" in (await response.json(content_type=None))["detail"]


async def test_stats_counts_open_by_service_and_severity_and_times_per_service(api: Api) -> None:
    """/v1/stats: unresolved incidents by service x severity; per service, incidents created in the
    window with MTTA (mean of creation to acknowledgement) and MTTR (creation to resolution)."""
    await seed(
        api.store,
        incident("a", service="api", severity="critical", acknowledged=timedelta(seconds=60),
                 resolved=timedelta(seconds=600), at=NOW - timedelta(hours=3)),
        incident("b", service="api", severity="critical", acknowledged=timedelta(seconds=120),
                 at=NOW - timedelta(hours=2)),
        incident("c", service="api", severity="low", at=NOW - timedelta(hours=1)),
        incident("d", service="db", severity="high", resolved=timedelta(seconds=30),
                 at=NOW - timedelta(days=2)),
        incident("old", service="db", severity="high", at=NOW - timedelta(days=30)),
    )  # fmt: skip
    status, stats = await get(api, "/v1/stats?window=7d")
    assert status == 200
    assert stats["window"] == "7d"
    assert stats["open"] == [
        {"service": "api", "severity": "critical", "count": 1},
        {"service": "api", "severity": "low", "count": 1},
        {"service": "db", "severity": "high", "count": 1},
    ]
    by_service = {s["service"]: s for s in stats["services"]}
    assert by_service["api"]["incidents"] == 3
    assert by_service["api"]["acknowledged"] == 2 and by_service["api"]["resolved"] == 1
    assert by_service["api"]["mtta_seconds"] == pytest.approx(90, abs=0.5)
    assert by_service["api"]["mttr_seconds"] == pytest.approx(600, abs=0.5)
    assert by_service["db"] == {"service": "db", "incidents": 1, "acknowledged": 0, "resolved": 1,
                                "mtta_seconds": None, "mttr_seconds": pytest.approx(30, abs=0.5)}  # fmt: skip
    status, day = await get(api, "/v1/stats?window=1d")
    assert {s["service"] for s in day["services"]} == {"api"}
    for bad in ("7", "0d", "400d", "7y"):
        status, problem = await get(api, f"/v1/stats?window={bad}")
        assert status == 400 and problem["detail"].startswith("window:"), (bad, problem)


async def test_reading_needs_a_token_with_the_read_role(api: Api) -> None:
    """No token: 401; a wrong one: 401; an ingest-only token: 403; read and write tokens may read."""
    assert (await api.client.get("/v1/incidents")).status == 401
    assert (await api.client.get("/v1/incidents", headers=bearer("x" * 30))).status == 401
    response = await api.client.get("/v1/stats", headers=bearer("ingest-token-0123456789abcdef"))
    assert response.status == 403
    assert (await api.client.get("/v1/incidents", headers=bearer(WRITE_TOKEN))).status == 200
    assert (await api.client.get("/v1/openapi.json")).status == 200  # the document is public


async def test_without_a_store_the_application_serves_only_the_ingest(
    tmp_path: Path, tokens_file: Path
) -> None:
    """``app.py ingest`` builds the application without a store: the API and the pages are not there
    (404), the ingest is."""
    async with serving(None, tokens_file) as ingest_only:
        assert (await ingest_only.client.get("/v1/incidents", headers=bearer(READ_TOKEN))).status == 404
        assert (await ingest_only.client.get("/")).status == 404
        response = await ingest_only.client.post("/v1/alertmanager", data=b"{}", headers=bearer(INGEST_TOKEN))
        assert response.status == 400  # the ingest's own validation: the route is there
