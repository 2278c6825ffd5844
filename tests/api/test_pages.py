"""The dashboard's pages over HTTP, without a browser: what a client without JavaScript gets, sign-in,
CSRF, roles, escaping (tests/browser drives the same pages in Chromium)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from structlog.testing import capture_logs

from tests.api.conftest import (
    READ_TOKEN,
    WRITE_TOKEN,
    WRITER,
    Api,
    incident,
    open_store,
    seed,
    serving,
)

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
async def site(tmp_path: Path, tokens_file: Path) -> AsyncIterator[Api]:
    """The application on SQLite with tokens (the dashboard's pages read the same store API as the JSON
    API, which tests/api/test_read.py runs on both stores)."""
    async with open_store("sqlite", tmp_path) as store, serving(store, tokens_file) as served:
        yield served


async def sign_in(site: Api, token: str) -> None:
    response = await site.client.post("/login", data={"token": token, "next": "/"}, allow_redirects=False)
    assert response.status == 303


async def page(site: Api, path: str) -> str:
    response = await site.client.get(path, allow_redirects=False)
    assert response.status == 200, (path, response.status)
    assert response.content_type == "text/html"
    return await response.text()


def csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found
    return found[1]


async def test_signing_in_sets_an_httponly_samesite_cookie(site: Api) -> None:
    """Without a session the pages redirect to the sign-in form; a wrong token gets the form again (401),
    a right one an HttpOnly, SameSite=Strict cookie and the page it came for."""
    response = await site.client.get("/history?service=api", allow_redirects=False)
    assert response.status == 303
    location = urlsplit(response.headers["Location"])
    assert location.path == "/login" and parse_qs(location.query) == {"next": ["/history?service=api"]}
    with capture_logs() as logs:
        wrong = await site.client.post("/login", data={"token": "nope-nope-nope-nope", "next": "/"})
    assert wrong.status == 401 and "not valid" in await wrong.text()
    assert [e["event"] for e in logs if e["event"] == "http.sign_in_failed"] == ["http.sign_in_failed"]
    assert "nope-nope" not in repr(logs)  # the token tried is never logged
    right = await site.client.post(
        "/login", data={"token": READ_TOKEN, "next": "/history"}, allow_redirects=False
    )
    assert right.status == 303 and right.headers["Location"] == "/history"
    cookie = right.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "viewer" in await page(site, "/history")


async def test_sign_in_redirects_only_within_the_site(site: Api) -> None:
    """``next`` pointing elsewhere (//evil.example, https://...) lands on / instead: no open redirect."""
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        response = await site.client.post(
            "/login", data={"token": READ_TOKEN, "next": target}, allow_redirects=False
        )
        assert response.headers["Location"] == "/"


async def test_dashboard_groups_open_incidents_by_service_and_severity(site: Api) -> None:
    """/ shows unresolved incidents only, grouped by service then severity, with counts; the filters live
    in the URL and work without JavaScript."""
    await seed(
        site.store,
        incident("api a", service="api", severity="critical"),
        incident("api b", service="api", severity="critical", acknowledged=timedelta(minutes=1)),
        incident("api c", service="api", severity="low"),
        incident("db a", service="db", severity="high", environment="staging"),
        incident("db gone", service="db", resolved=timedelta(minutes=1)),
    )
    await sign_in(site, READ_TOKEN)
    html = await page(site, "/")
    assert 'id="open-total">4<' in html
    assert "db gone" not in html
    sections = re.findall(r'<section class="group" id="svc-\d+" data-service="([^"]+)">', html)
    assert sections == ["api", "db"]
    api_section = html[html.index('data-service="api"') : html.index('data-service="db"')]
    assert re.search(r"sev-critical\">critical</span> <span class=\"count\">2</span>", api_section)
    assert re.search(r"sev-low\">low</span> <span class=\"count\">1</span>", api_section)
    filtered = await page(site, "/?service=db&environment=staging&severity=&since=")
    assert "db a" in filtered and "api a" not in filtered
    assert '<option value="db" selected>' in filtered
    response = await site.client.get("/?severity=urgent")
    assert response.status == 400 and "severity: Input should be" in await response.text()


async def test_history_lists_resolved_incidents_a_page_at_a_time(site: Api) -> None:
    """/history: resolved only, newest first, 50 a page with an "Older" link keeping the filters."""
    start = incident().created_at
    done = [incident(f"done {n}", resolved=timedelta(1), service="api", at=start - timedelta(minutes=n))
            for n in range(55)]  # fmt: skip
    await seed(site.store, *done)
    await seed(site.store, incident("still open", service="api"))
    await sign_in(site, READ_TOKEN)
    first = await page(site, "/history?service=api")
    assert "still open" not in first and "done 0" in first and "done 49<" in first and "done 50<" not in first
    older = re.search(r'class="older" href="([^"]+)"', first)
    assert older and "service=api" in older[1]
    second = await page(site, older[1].replace("&amp;", "&"))
    assert "done 50<" in second and "done 54<" in second and "done 0<" not in second


async def test_titles_notes_and_labels_from_outside_show_as_text(site: Api) -> None:
    """A title, service and note containing markup are escaped on every page; the pages forbid inline
    script (Content-Security-Policy), so even a missed escape could not run."""
    (target,) = await seed(site.store, incident(EVIL, service="<b>svc</b>"))
    target.add_note(note=EVIL, at=target.created_at, actor="<i>me</i>", message_id="m")
    async with site.store.transaction("note") as tx:
        await tx.update(target)
    await sign_in(site, WRITE_TOKEN)
    for path in ("/", f"/incidents/{target.id}", "/?service=%3Cb%3Esvc%3C%2Fb%3E"):
        html = await page(site, path)
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>svc</b>" not in html
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    response = await site.client.get(f"/incidents/{target.id}")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "&lt;i&gt;me&lt;/i&gt;" in await response.text()


async def test_buttons_publish_as_the_signed_in_token_with_a_csrf_token(site: Api) -> None:
    """Acknowledge from the incident page: published with the token's name as actor, then back to the
    page saying it was sent; the store itself is unchanged until the worker applies it."""
    (target,) = await seed(site.store, incident("api down"))
    await sign_in(site, WRITE_TOKEN)
    html = await page(site, f"/incidents/{target.id}")
    assert 'id="acknowledge"' in html and 'id="resolve"' in html
    response = await site.client.post(
        f"/incidents/{target.id}/acknowledge", data={"csrf": csrf(html), "key": "k1"}, allow_redirects=False
    )
    assert response.status == 303
    assert response.headers["Location"] == f"/incidents/{target.id}?sent=incident.acknowledge"
    (message,) = site.published()
    assert b'"actor": "' + WRITER.encode() + b'"' in message.body
    assert (await site.store.get(target.id)).status == "open"
    assert "Sent <code>incident.acknowledge</code>" in await page(site, response.headers["Location"])


async def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(site: Api) -> None:
    """A forged form (no or wrong CSRF token, or an Origin of another site) is a 403 and publishes nothing,
    even with the session cookie the browser would send along."""
    (target,) = await seed(site.store, incident())
    await sign_in(site, WRITE_TOKEN)
    token = csrf(await page(site, f"/incidents/{target.id}"))
    path = f"/incidents/{target.id}/resolve"
    assert (await site.client.post(path, data={}, allow_redirects=False)).status == 403
    assert (await site.client.post(path, data={"csrf": "0" * 64}, allow_redirects=False)).status == 403
    other = await site.client.post(path, data={"csrf": token}, headers={"Origin": "https://evil.example"},
                                   allow_redirects=False)  # fmt: skip
    assert other.status == 403
    assert site.published() == []


async def test_a_read_token_sees_no_buttons_and_cannot_post(site: Api) -> None:
    """Signed in with a read-only token: the incident page has no action buttons, and posting the form
    anyway is a 403."""
    (target,) = await seed(site.store, incident())
    await sign_in(site, READ_TOKEN)
    html = await page(site, f"/incidents/{target.id}")
    assert 'id="acknowledge"' not in html and 'id="add-note"' not in html
    response = await site.client.post(f"/incidents/{target.id}/acknowledge", data={"csrf": csrf(html)})
    assert response.status == 403
    assert site.published() == []


async def test_without_tokens_the_pages_need_no_sign_in(tmp_path: Path) -> None:
    """``run`` on loopback without a tokens file: no sign-in form, the pages open directly, and the
    buttons still need the CSRF token."""
    async with open_store("sqlite", tmp_path) as store, serving(store, None) as site:
        (target,) = await seed(store, incident("api down"))
        assert (await site.client.get("/login", allow_redirects=False)).headers["Location"] == "/"
        html = await page(site, f"/incidents/{target.id}")
        assert (await site.client.post(f"/incidents/{target.id}/acknowledge", data={})).status == 403
        ok = await site.client.post(f"/incidents/{target.id}/acknowledge", data={"csrf": csrf(html)},
                                    allow_redirects=False)  # fmt: skip
        assert ok.status == 303
        assert len(site.published()) == 1


async def test_a_double_click_is_one_message_and_two_notes_are_two(site: Api) -> None:
    """The same Acknowledge form sent twice (a double click) publishes one message id; two different notes
    sent from the same page are two messages."""
    (target,) = await seed(site.store, incident())
    await sign_in(site, WRITE_TOKEN)
    html = await page(site, f"/incidents/{target.id}")
    key = re.search(r'name="key" value="([0-9a-f]+-ack)"', html)
    assert key
    for _ in range(2):
        form = {"csrf": csrf(html), "key": key[1]}
        await site.client.post(f"/incidents/{target.id}/acknowledge", data=form, allow_redirects=False)
    note_key = re.search(r'name="key" value="([0-9a-f]+-note)"', html)
    assert note_key
    for note in ("first", "second"):
        form = {"csrf": csrf(html), "key": note_key[1], "note": note}
        await site.client.post(f"/incidents/{target.id}/notes", data=form, allow_redirects=False)
    ids = [m.message_id for m in site.published()]
    assert len(ids) == 4 and ids[0] == ids[1] and len({ids[1], ids[2], ids[3]}) == 3


async def test_the_stats_page_shows_mtta_and_mttr_per_service(site: Api) -> None:
    """/stats: per service over 7 days, how many incidents, acknowledged, resolved, and MTTA / MTTR as
    durations a person reads."""
    await seed(
        site.store,
        incident(
            "a", service="api", acknowledged=timedelta(seconds=90), resolved=timedelta(hours=2, minutes=5)
        ),
        incident("b", service="db", acknowledged=timedelta(seconds=30)),
    )
    await sign_in(site, READ_TOKEN)
    html = await page(site, "/stats")
    rows = re.findall(r"<tr><td>([^<]+)</td>((?:<td class=\"num\">[^<]*</td>)+)</tr>", html)
    cells = {service: re.findall(r">([^<]*)<", numbers)[::2] for service, numbers in rows}
    assert cells["api"] == ["1", "1", "1", "1m 30s", "2h 05m"]
    assert cells["db"] == ["1", "1", "0", "0m 30s", "-"]
