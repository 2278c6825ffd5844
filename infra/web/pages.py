"""The dashboard: server-rendered pages on the API's own reads and actions (docs/api.md, "Dashboard").

Readable without JavaScript (every page is plain HTML, filters are GET forms kept in the URL); with it,
``static/app.js`` reloads the page's data every ``refresh_seconds`` and carries the dark-mode toggle.
Jinja2 with autoescape on every template: titles, labels and notes come from outside and always show as
text. A strict Content-Security-Policy (no inline script or style) backs that up.

Signing in: a form takes a token of the tokens file and sets it as an HttpOnly, SameSite=Strict cookie
(Secure over HTTPS). Acting: each button is a POST form carrying a CSRF token derived from the session
(an HMAC keyed by the token itself, so it holds across replicas and restarts, and a page of another site
can neither read nor compute it) and a cross-origin ``Origin`` is refused. Without a tokens file (``run``
on loopback) there is no sign-in, and the CSRF key is a random secret of the process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit
from uuid import UUID

import jinja2
import structlog
from aiohttp import web

from application.incidents import Incident
from infra.web.api import (
    ACTIONS,
    MAX_NOTE,
    SEVERITIES,
    ListParams,
    act,
    detail,
    page,
    parse_params,
    reader,
    stats,
)
from infra.web.app import DEPS, PRINCIPAL, Problem
from infra.web.auth import ANONYMOUS, Principal

log = structlog.get_logger("incidentd.http")
HERE = Path(__file__).parent
COOKIE = "incidentd_session"
SECRET = web.AppKey("pages_secret", bytes)  # the CSRF key when there are no tokens
ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
DASHBOARD_LIMIT = 500  # unresolved incidents on the dashboard; past it the page says so
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
PageHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _when(value: datetime | str | None) -> str:
    if value is None or value == "":
        return ""
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


ENV.filters["when"] = _when
ENV.filters["duration"] = _seconds


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    deps = request.app[DEPS]
    caller: Principal = request.get(PRINCIPAL) or ANONYMOUS
    html = ENV.get_template(template).render(
        caller=caller, signed_in=deps.tokens is not None, path=request.path_qs,
        refresh=deps.refresh_seconds, csrf=csrf_token(request), **context,
    )  # fmt: skip
    return web.Response(text=html, status=status, content_type="text/html", headers=HEADERS)


# --- who is calling ---------------------------------------------------------------------------------


def _session(request: web.Request) -> str:
    return request.cookies.get(COOKIE, "")


def csrf_token(request: web.Request) -> str:
    key = _session(request).encode() or request.app[SECRET]
    return hmac.new(key, b"incidentd-csrf", hashlib.sha256).hexdigest()


def caller(request: web.Request, role: str) -> Principal:
    """The signed-in caller, with ``role``; a redirect to the sign-in form, or a 403 page."""
    deps = request.app[DEPS]
    if deps.tokens is None:
        found: Principal | None = ANONYMOUS
    else:
        session = _session(request)
        found = deps.tokens.authenticate(f"Bearer {session}") if session else None
    if found is None:
        raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
    request[PRINCIPAL] = found
    if role not in found.roles:
        raise Problem(403, "forbidden", f"the token {found.name!r} lacks the role {role!r}")
    return found


async def check_form(request: web.Request) -> dict[str, str]:
    """The posted form, once its origin and CSRF token are checked (403 otherwise)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null" and urlsplit(origin).netloc != request.host:
        raise Problem(403, "csrf", f"a form posted from {origin[:100]!r}")
    form = await request.post()
    sent = str(form.get("csrf", ""))
    if not hmac.compare_digest(sent.encode(), csrf_token(request).encode()):
        raise Problem(403, "csrf", "the form's CSRF token is missing or stale; reload the page")
    return {key: str(value) for key, value in form.items()}


def html_errors(handler: PageHandler) -> PageHandler:
    """A page's errors as a page (the API's are problem+json)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Problem as problem:
            return render(request, "error.html", status=problem.status, problem=problem)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


# --- pages ------------------------------------------------------------------------------------------

routes = web.RouteTableDef()
FILTERS = ("environment", "severity", "service", "since")
RANGES = {"": "any time", "1h": "last hour", "24h": "last 24 hours", "7d": "last 7 days",
          "30d": "last 30 days"}  # fmt: skip


def _filters(request: web.Request) -> dict[str, str]:
    return {k: request.query.get(k, "") for k in FILTERS}


async def _facets(request: web.Request, shown: list[Incident]) -> dict[str, Any]:
    """The choices of the filter form: the services with unresolved incidents (one GROUP BY, the
    active-incidents gauge's), and the environments of the incidents shown."""
    active = await reader(request).count_active()
    return {
        "services": sorted({service for _, service in active} | {i.service for i in shown} - {""}),
        "environments": sorted({i.environment for i in shown if i.environment}),
    }


@routes.get("/", name="dashboard")
@html_errors
async def dashboard(request: web.Request) -> web.Response:
    """Unresolved incidents grouped by service, then severity, with counts."""
    caller(request, "read")
    params = parse_params(ListParams, _only(request, FILTERS))
    params = params.model_copy(update={"status": ("open", "acknowledged"), "limit": DASHBOARD_LIMIT})
    items, more = await page(reader(request), params)
    groups: dict[str, dict[str, list[Incident]]] = {}
    for incident in items:
        service = groups.setdefault(incident.service or "(no service)", {})
        service.setdefault(incident.severity, []).append(incident)
    ordered = {
        service: {sev: groups[service][sev] for sev in SEVERITIES if sev in groups[service]}
        for service in sorted(groups)
    }
    return render(
        request, "dashboard.html", groups=ordered, total=len(items), truncated=more is not None,
        severities=SEVERITIES, filters=_filters(request), ranges=RANGES, **await _facets(request, items),
    )  # fmt: skip


@routes.get("/history", name="history")
@html_errors
async def history(request: web.Request) -> web.Response:
    """Resolved incidents, newest first, a page at a time."""
    caller(request, "read")
    params = parse_params(ListParams, _only(request, (*FILTERS, "cursor")))
    params = params.model_copy(update={"status": ("resolved",), "limit": 50})
    items, cursor = await page(reader(request), params)
    older = None
    if cursor:
        kept = {k: v for k, v in _filters(request).items() if v}
        older = "/history?" + urlencode({**kept, "cursor": cursor})
    return render(
        request, "history.html", items=items, older=older, filters=_filters(request), ranges=RANGES,
        severities=SEVERITIES, **await _facets(request, items),
    )  # fmt: skip


def _only(request: web.Request, names: tuple[str, ...]) -> web.Request:
    """The request with only the query parameters a page reads (others, e.g. ``sent``, are the page's)."""
    query = {k: v for k, v in request.query.items() if k in names}
    return request.clone(rel_url=request.rel_url.with_query(query))


async def _incident(request: web.Request) -> Incident:
    raw = request.match_info["id"]
    try:
        wanted = UUID(raw)
    except ValueError:
        raise Problem(404, "unknown-incident", "no such incident") from None
    incident = await reader(request).get(wanted)
    if incident is None:
        raise Problem(404, "unknown-incident", f"no incident {wanted}")
    return incident


def _form_key(incident: Incident) -> str:
    """The buttons' idempotency key: the incident as the page showed it. A double click, or the same form
    sent twice, is one message; once the incident changed, the page (refreshed) carries a new key."""
    seen = f"{incident.id}:{len(incident.timeline)}:{incident.status}".encode()
    return hashlib.sha256(seen).hexdigest()[:24]


@routes.get("/incidents/{id}", name="incident-page")
@html_errors
async def incident_page(request: web.Request) -> web.Response:
    """One incident: its fields, references, buttons, enrichment, correlation group and timeline."""
    who = caller(request, "read")
    incident = await _incident(request)
    doc = await detail(reader(request), incident)
    return render(
        request, "incident.html", incident=incident, doc=doc, can_act="write" in who.roles,
        sent=request.query.get("sent", ""), key=_form_key(incident), max_note=MAX_NOTE,
    )  # fmt: skip


@routes.post("/incidents/{id}/{action:acknowledge|resolve|notes}", name="incident-page-action")
@html_errors
async def incident_action(request: web.Request) -> web.Response:
    """A button: published like the API's action (the worker applies it), then back to the page."""
    caller(request, "write")
    form = await check_form(request)
    incident = await _incident(request)
    action = request.match_info["action"]
    note = form.get("note", "").strip()[:MAX_NOTE]
    if action == "notes" and not note:
        raise Problem(400, "invalid-body", "a note needs some text")
    key = form.get("key") or None
    if key and action == "notes":  # two different notes from one page are two messages
        key = f"{key}:{hashlib.sha256(note.encode()).hexdigest()}"
    await act(request, incident, action, note, key)
    raise web.HTTPSeeOther(f"/incidents/{incident.id}?" + urlencode({"sent": ACTIONS[action]}))


@routes.get("/stats", name="stats-page")
@html_errors
async def stats_page(request: web.Request) -> web.Response:
    """MTTA and MTTR per service over the last 7 days; open incidents by service and severity."""
    caller(request, "read")
    return render(request, "stats.html", stats=await stats(reader(request), "7d"))


@routes.get("/login", name="login")
async def login_form(request: web.Request) -> web.StreamResponse:
    """The sign-in form (no form without tokens: there is nothing to sign in to)."""
    if request.app[DEPS].tokens is None:
        raise web.HTTPSeeOther("/")
    return render(request, "login.html", next=_safe_next(request.query.get("next", "/")), failed=False)


@routes.post("/login", name="login-post")
async def login(request: web.Request) -> web.StreamResponse:
    """A valid token becomes the session cookie (HttpOnly, SameSite=Strict); a wrong one, the form again."""
    deps = request.app[DEPS]
    if deps.tokens is None:
        raise web.HTTPSeeOther("/")
    form = await request.post()
    token, target = str(form.get("token", "")).strip(), _safe_next(str(form.get("next", "/")))
    found = deps.tokens.authenticate(f"Bearer {token}") if token else None
    if found is None:
        log.warning("http.sign_in_failed", remote=request.remote or "")  # never the token
        return render(request, "login.html", status=401, next=target, failed=True)
    response = web.HTTPSeeOther(target)
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/",
                        max_age=12 * 3600)  # fmt: skip
    raise response


@routes.post("/logout", name="logout")
@html_errors
async def logout(request: web.Request) -> web.StreamResponse:
    caller(request, "read")
    await check_form(request)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


def _safe_next(target: str) -> str:
    """Only a path of this site (never ``//host`` or a URL): no open redirect."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def setup(app: web.Application) -> None:
    """Add the pages and their static files to ``app``."""
    app[SECRET] = secrets.token_bytes(32)
    app.add_routes(routes)
    app.router.add_static("/static", HERE / "static", name="static", append_version=False)
