"""The one aiohttp application of a process: :func:`make_app` builds it from :class:`HttpDeps`.

Each area adds its ``web.RouteTableDef`` here (``ingest`` now; the incident API and the pages later);
every route declares the role it needs with :func:`requires`. One middleware wraps every
request: ``answer`` checks the token, the role and the caller's rate limit (:func:`authorize`) before a
handler runs, turns every error into ``application/problem+json`` (RFC 9457, a stable ``type`` per
reason), counts and logs the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from aiohttp import web

from application.factory import CommandFactory
from application.ports import IncidentReader, Publisher
from infra.web.auth import ANONYMOUS, FailureLimiter, Principal, RateLimiter, Tokens, retry_after
from infra.web.metrics import HttpMetrics

log = structlog.get_logger("incidentd.http")

PROBLEM_TYPE = "urn:incidentd:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"
TITLES = {
    "invalid-body": "The body is not a valid event of this endpoint",
    "too-large": "The body is over the size limit",
    "read-timeout": "The body did not arrive in time",
    "unauthorized": "A valid token is required",
    "forbidden": "The token lacks the role this endpoint needs",
    "rate-limited": "Too many requests for this token",
    "broker-unavailable": "The broker did not confirm the message; nothing was accepted",
    "unknown-command-type": "No such command type",
    "not-found": "No such endpoint",
    "method-not-allowed": "Method not allowed on this endpoint",
    "internal-error": "Internal error",
    "invalid-query": "A query value is not valid",
    "unknown-incident": "No such incident",
    "csrf": "The form did not come from this site",
}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="incidentd", Basic realm="incidentd"'}
_HTTP_KINDS = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 408: "read-timeout"}
ROLE_ATTR = "incidentd_role"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class HttpDeps:
    """What the handlers use. ``tokens`` None: no authentication (see infra.web.server.plan_auth)."""

    publisher: Publisher
    factory: CommandFactory
    metrics: HttpMetrics
    tokens: Tokens | None
    limiter: RateLimiter
    # Failed authentications per peer address (429 once its bucket is empty); the default: 10 at once,
    # then one every 5 s.
    failures: FailureLimiter = field(default_factory=lambda: FailureLimiter(0.2, 10))
    max_body_bytes: int = 5 * 1024 * 1024
    read_timeout: float = 10.0
    publish_timeout: float = 10.0
    retry_after: int = 5
    tokens_reload_interval: float = 5.0
    # The incident store, read by the API and the dashboard (infra/web/api.py, pages.py); None: ingest only.
    store: IncidentReader | None = None
    refresh_seconds: int = 15  # the dashboard reloads its data this often


DEPS = web.AppKey("deps", HttpDeps)
PRINCIPAL = web.RequestKey("principal", Principal)  # the authenticated caller
MESSAGE_ID = web.RequestKey("message_id", str)  # the id of the message a request published


class Problem(Exception):
    """An error answer: raise it from a handler; the ``answer`` middleware renders it."""

    def __init__(self, status: int, kind: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail
        self.headers = dict(headers or {})

    def response(self, instance: str) -> web.Response:
        doc = {
            "type": PROBLEM_TYPE + self.kind,
            "title": TITLES.get(self.kind, self.kind),
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        return web.Response(
            status=self.status, text=json.dumps(doc), content_type=PROBLEM_CONTENT_TYPE, headers=self.headers
        )


def requires(role: str) -> Callable[[H], H]:
    """Marks a route handler with the role its caller needs (``ingest``, ``read`` or ``write``)."""

    def mark(handler: H) -> H:
        setattr(handler, ROLE_ATTR, role)
        return handler

    return mark


def principal(request: web.Request) -> Principal:
    return request.get(PRINCIPAL) or ANONYMOUS


def endpoint(request: web.Request) -> str:
    """The route's name (a closed set, fit for a metric label); ``other`` when none matched."""
    route = request.match_info.route
    return route.name if route is not None and route.name else "other"


@web.middleware
async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware: authorize, run the handler, render any error as problem+json, count and log
    the answer (one line). One middleware, not two: each layer costs a call and a frame per request."""
    deps = request.app[DEPS]
    started = time.perf_counter()
    problem: Problem | None = None
    try:
        authorize(request, deps)
        response = await handler(request)
    except Problem as exc:
        problem = exc
    except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body over client_max_size
        if exc.status < 400:
            raise
        kind = _HTTP_KINDS.get(exc.status, "internal-error" if exc.status >= 500 else "invalid-body")
        allow = {k: v for k, v in exc.headers.items() if k == "Allow"}
        problem = Problem(exc.status, kind, exc.reason, allow)
    except Exception as exc:
        log.exception("http.internal_error", endpoint=endpoint(request))
        problem = Problem(500, "internal-error", f"{type(exc).__name__}; see the server's log")
    if problem is not None:
        response = problem.response(request.path)
        deps.metrics.reject(problem.kind)
    name = endpoint(request)
    status = response.status
    deps.metrics.answered(name, status)
    caller = request.get(PRINCIPAL)
    sender = caller.name if caller is not None else ANONYMOUS.name
    ms = round((time.perf_counter() - started) * 1000, 1)
    if problem is not None:
        log.info("http.rejected", reason=problem.kind, detail=problem.detail, endpoint=name, status=status,
                 sender=sender, ms=ms)  # fmt: skip
    else:
        log.info("http.answered", message_id=request.get(MESSAGE_ID, ""), endpoint=name, status=status,
                 sender=sender, ms=ms)  # fmt: skip
    return response


def authorize(request: web.Request, deps: HttpDeps) -> None:
    """Token, role, then the caller's rate limit; raises the Problem that answers otherwise.

    A peer whose wrong tokens emptied its failure bucket gets 429 before any token is checked, so
    guessing slows to the bucket's rate whatever it guesses (the right token included)."""
    role = getattr(request.match_info.handler, ROLE_ATTR, None)
    if role is None:  # no route matched: 404 / 405, nothing to protect
        return
    caller = ANONYMOUS if deps.tokens is None else _authenticate(request, deps.tokens, deps.failures)
    request[PRINCIPAL] = caller
    if role not in caller.roles:
        raise Problem(403, "forbidden", f"the token {caller.name!r} lacks the role {role!r}")
    wait = deps.limiter.admit(caller.name)
    if wait > 0:
        raise Problem(
            429, "rate-limited", f"over {deps.limiter.rate:g} requests/s for {caller.name!r}",
            {"Retry-After": retry_after(wait)},
        )  # fmt: skip


def _authenticate(request: web.Request, tokens: Tokens, failures: FailureLimiter) -> Principal:
    peer = request.remote or ""
    wait = failures.blocked(peer)
    if wait > 0:
        raise Problem(
            429, "rate-limited", "too many failed authentications from this address",
            {"Retry-After": retry_after(wait)},
        )  # fmt: skip
    caller = tokens.authenticate(request.headers.get("Authorization"))
    if caller is None:
        failures.failed(peer)
        raise Problem(401, "unauthorized", "a valid token is required", _CHALLENGE)
    return caller


async def _watch_tokens(app: web.Application) -> AsyncIterator[None]:
    deps = app[DEPS]
    if deps.tokens is None:
        yield
        return
    task = asyncio.create_task(deps.tokens.watch(deps.tokens_reload_interval), name="http-tokens-watch")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(deps: HttpDeps) -> web.Application:
    """The application: ingest routes (``/v1/...``); the body limit is ``deps.max_body_bytes``."""
    from infra.web import ingest

    app = web.Application(middlewares=[answer], client_max_size=deps.max_body_bytes)
    app[DEPS] = deps
    app.add_routes(ingest.routes)
    if deps.store is not None:
        from infra.web import api, pages

        app.add_routes(api.routes)
        pages.setup(app)
    app.cleanup_ctx.append(_watch_tokens)
    return app
