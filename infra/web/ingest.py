"""The ingest routes: a webhook in, validated by the worker's own factory, published, answered.

``202`` only once the broker confirmed the message; a broker that is down, blocked or slower than
``http_publish_timeout`` gives ``503`` with ``Retry-After`` (Alertmanager and EventBridge retry 5xx); a
body the worker would dead-letter gives ``400`` with the very reason the dead letter would carry, and is
not published. The message id is a digest of the endpoint and the body, so a sender's retry of a request
whose answer it lost is the same message to the worker's idempotency record: one effect.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import orjson
import structlog
from aiohttp import web

from application.commands import (
    AcknowledgeIncident,
    AddNote,
    AlertmanagerWebhook,
    AwsEvent,
    CreateIncident,
    OpsgenieAction,
    ResolveIncident,
)
from application.errors import DecodeError
from application.messages import TYPE_ATTR, Message
from infra.web.app import DEPS, MESSAGE_ID, HttpDeps, Problem, endpoint, principal, requires
from infra.web.auth import retry_after

log = structlog.get_logger("incidentd.http")

routes = web.RouteTableDef()

# Who sent a message (the token's name), for the worker's logs; never the token.
SENDER_ATTR = "x-incidentd-sender"
COMMAND_TYPES = {c.TYPE for c in (CreateIncident, AcknowledgeIncident, ResolveIncident, AddNote)}


@routes.post("/v1/alertmanager", name="alertmanager")
@requires("ingest")
async def alertmanager(request: web.Request) -> web.Response:
    """Alertmanager's webhook (version 4) as sent: groupKey and unknown fields kept."""
    return await ingest(request, AlertmanagerWebhook.TYPE)


@routes.post("/v1/opsgenie", name="opsgenie")
@requires("ingest")
async def opsgenie(request: web.Request) -> web.Response:
    """An Opsgenie / OEC alert action."""
    return await ingest(request, OpsgenieAction.TYPE)


@routes.post("/v1/events", name="events")
@requires("ingest")
async def events(request: web.Request) -> web.Response:
    """An EventBridge event (AWS Health, Security Hub) as an API destination sends it."""
    return await ingest(request, AwsEvent.TYPE)


@routes.post("/v1/commands/{type}", name="commands")
@requires("write")
async def commands(request: web.Request) -> web.Response:
    """incident.create | incident.acknowledge | incident.resolve | incident.note, for scripts. The actor
    on the timeline is the token's name (see :func:`as_actor`)."""
    type_name = request.match_info["type"]
    if type_name not in COMMAND_TYPES:
        known = ", ".join(sorted(COMMAND_TYPES))
        raise Problem(404, "unknown-command-type", f"unknown command type {type_name!r} (known: {known})")
    return await ingest(request, type_name, actor=request.app[DEPS].tokens is not None)


async def ingest(request: web.Request, type_name: str, *, actor: bool = False) -> web.Response:
    """Read → validate with the worker's factory → publish with a stable id → 202 after the confirm.
    ``actor``: the published body names the caller as its actor (:func:`as_actor`)."""
    deps = request.app[DEPS]
    body = await read_body(request, deps)
    if actor:
        body = as_actor(body, principal(request).name)
    try:
        deps.factory.decode(Message(body, {TYPE_ATTR: type_name}))
    except DecodeError as exc:
        raise Problem(400, "invalid-body", str(exc)) from None
    message_id = stable_id(request.path, body)
    request[MESSAGE_ID] = message_id
    attributes = {TYPE_ATTR: type_name, SENDER_ATTR: principal(request).name}
    await publish(request, deps, body, attributes, message_id)
    answer = orjson.dumps({"status": "accepted", "type": type_name, "message_id": message_id})
    return web.Response(body=answer, status=202, content_type="application/json")


def as_actor(body: bytes, name: str) -> bytes:
    """The command with ``actor`` set to the token's name: who acted is who authenticated, not what the
    body claims. A body naming another actor is refused (400) rather than silently rewritten, so a script
    that thinks it acts as someone else finds out. A body that is not a JSON object is returned as is:
    the factory then refuses it with the dead letter's reason."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(data, dict):
        return body
    claimed = data.get("actor", name)
    if claimed != name:
        raise Problem(
            400, "invalid-body",
            f"actor: the actor is the token's name; omit it or send {name!r}, not {claimed!r}"[:500],
        )  # fmt: skip
    data["actor"] = name
    return orjson.dumps(data)


def stable_id(path: str, body: bytes) -> str:
    """The same request (endpoint and body, byte for byte) always gets the same message id."""
    return "http-" + hashlib.sha256(path.encode() + b"\n" + body).hexdigest()[:40]


async def read_body(request: web.Request, deps: HttpDeps) -> bytes:
    if request.content_length is not None and request.content_length > deps.max_body_bytes:
        raise Problem(413, "too-large", f"{request.content_length} bytes; the limit is {deps.max_body_bytes}")
    try:
        if request.content.is_eof():  # the whole body is buffered already (the usual case): no timer
            return await request.read()
        async with asyncio.timeout(deps.read_timeout):
            return await request.read()
    except TimeoutError:
        raise Problem(408, "read-timeout", f"the body did not arrive within {deps.read_timeout:g}s") from None
    except web.HTTPRequestEntityTooLarge:
        raise Problem(413, "too-large", f"over the limit of {deps.max_body_bytes} bytes") from None


async def publish(
    request: web.Request, deps: HttpDeps, body: bytes, attributes: dict[str, str], message_id: str
) -> None:
    """Return once the broker confirmed; else 503 + Retry-After. Any failure here means "not confirmed"
    (the sender must retry), so every exception becomes a 503, logged with its type."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(deps.publish_timeout):
            await deps.publisher.publish(body, attributes, message_id=message_id)
    except Exception as exc:
        reason = f"no confirm within {deps.publish_timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
        log.warning("http.publish_failed", message_id=message_id, error=type(exc).__name__, reason=reason)
        detail = f"message {message_id} was not confirmed by the broker ({reason}); retry"
        headers = {"Retry-After": retry_after(deps.retry_after)}
        raise Problem(503, "broker-unavailable", detail, headers) from None
    finally:
        deps.metrics.published(endpoint(request), time.perf_counter() - started)
