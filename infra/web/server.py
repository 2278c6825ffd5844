"""Running the application: who may call (:func:`plan_auth`), the listener (:class:`HttpServer`) and
the broker readiness check of ``/readyz`` (:func:`broker_check`)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from application.factory import CommandFactory
from application.ports import Broker
from infra.web.app import DEPS, HttpDeps
from infra.web.auth import FailureLimiter, RateLimiter, Tokens, TokensError
from infra.web.metrics import HttpMetrics

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from config.settings import Settings


log = structlog.get_logger("incidentd.http")


class RefusedToStart(Exception):
    """The settings would expose the front door unsafely; the message is the one line to print."""


@dataclass(frozen=True)
class AuthPlan:
    tokens: Tokens | None
    says: str  # what the process says at start-up about who may call


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan_auth(settings: Settings, host: str) -> AuthPlan:
    """Tokens when a file is given; no authentication when asked for (``http_auth=none``) or on the
    embedded default bound to loopback; otherwise refuse to start."""
    if settings.http_tokens_file is not None:
        try:
            tokens = Tokens.load(settings.http_tokens_file)
        except TokensError as exc:
            raise RefusedToStart(f"INCIDENTD_HTTP_TOKENS_FILE: {exc}") from None
        return AuthPlan(tokens, f"bearer/basic tokens from {settings.http_tokens_file} ({len(tokens.names)})")
    if settings.http_auth == "none":
        return AuthPlan(None, "NO authentication (INCIDENTD_HTTP_AUTH=none)")
    if settings.broker == "memory" and is_loopback(host):
        return AuthPlan(None, f"no authentication: embedded broker, bound to loopback {host}")
    where = "a real broker" if settings.broker != "memory" else f"the non-loopback address {host}"
    raise RefusedToStart(
        f"refusing to serve on {where} without INCIDENTD_HTTP_TOKENS_FILE "
        "(set it, or INCIDENTD_HTTP_AUTH=none to serve without authentication)"
    )


def build_deps(settings: Settings, broker: Broker, registry: CollectorRegistry, tokens: Tokens | None,
               commands: Any) -> HttpDeps:  # fmt: skip
    """The handlers' dependencies: the broker's publisher and the worker's factory (``commands``: the
    handler registry the worker's dispatcher is built from)."""
    return HttpDeps(
        publisher=broker.publisher,
        factory=CommandFactory(commands),
        metrics=HttpMetrics(registry),
        tokens=tokens,
        limiter=RateLimiter(settings.http_rate_limit, settings.http_rate_burst),
        failures=FailureLimiter(settings.http_auth_failure_rate, settings.http_auth_failure_burst),
        max_body_bytes=settings.http_max_body_bytes,
        read_timeout=settings.http_read_timeout,
        publish_timeout=settings.http_publish_timeout,
        retry_after=settings.http_retry_after,
        tokens_reload_interval=settings.http_tokens_reload_interval,
    )


class _HeaderDeadline(web.RequestHandler):
    """aiohttp's connection handler with a deadline on a request's headers.

    aiohttp bounds the body only where the handler reads it (``read_body``: 408) and an idle connection
    by its keep-alive timeout; headers that trickle in a byte at a time (slowloris) would hold the
    connection and its buffers for as long as the client likes. Here the first byte of a request starts
    a timer of ``header_timeout`` seconds; the complete headers stop it; if it fires first, the
    connection gets a 408 and is closed. Bytes that finish the previous request's body (one a handler
    answered without reading it all) are not a new request: no timer then. Relies on aiohttp's
    ``_request_count`` (requests whose headers were parsed), ``_messages`` and ``_request_in_progress``;
    tests/ingest/test_abuse.py proves it."""

    __slots__ = ("_body", "_deadline", "_header_timeout", "_on_timeout")

    def __init__(self, manager: web.Server, *, header_timeout: float, on_timeout: Callable[[], None],
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(manager, **kwargs)
        self._header_timeout, self._on_timeout = header_timeout, on_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._body: Any = None  # the body (a StreamReader) of the last request whose headers arrived

    def data_received(self, data: bytes) -> None:
        in_body = self._body is not None and not self._body.is_eof()  # these bytes continue a body
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a request's headers arrived whole
            self._stop_deadline()
            self._body = self._messages[-1][1] if self._messages else None
        elif data and self._deadline is None and not in_body:  # aiohttp calls it with b"" too
            self._deadline = self._loop.call_later(self._header_timeout, self._headers_too_late)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_late(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        if self._request_in_progress or self._messages:  # pipelined behind a request: wait for its answer
            self._deadline = self._loop.call_later(self._header_timeout, self._headers_too_late)
            return
        self._on_timeout()
        transport.write(_HEADER_TIMEOUT_ANSWER)
        self.force_close()
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)


_HEADER_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _Server(web.Server):
    """Makes :class:`_HeaderDeadline` handlers (aiohttp's ``Server`` makes plain ones)."""

    def __call__(self) -> web.RequestHandler:
        return _HeaderDeadline(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose server is a :class:`_Server` (the runner's keyword arguments reach each
    connection handler, ``header_timeout`` and ``on_timeout`` included)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same object layout; only __call__ differs
        return server


class HttpServer:
    """The application on ``host:port``. :meth:`stop` stops accepting at once, then waits (at most
    ``shutdown_timeout``) for the requests in flight, each of which waits for its broker confirm.
    A request whose headers take longer than the read timeout loses its connection (slowloris)."""

    def __init__(self, app: web.Application, host: str, port: int, *, shutdown_timeout: float = 25.0) -> None:
        self.app = app
        self._host, self._port = host, port
        deps = app[DEPS]

        def too_late() -> None:
            deps.metrics.reject("read-timeout")
            log.info("http.rejected", reason="read-timeout", detail="headers not in time", status=408)

        # No aiohttp access log: the ``answer`` middleware logs one line per request, without headers.
        self._runner = _Runner(
            app, access_log=None, shutdown_timeout=shutdown_timeout,
            header_timeout=deps.read_timeout, on_timeout=too_late,
        )  # fmt: skip

    @property
    def port(self) -> int:
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()


def broker_check(broker: Broker, settings: Settings) -> Callable[[], Any]:
    """``/readyz``'s broker check for a process that only publishes: RabbitMQ's connection is up; the
    Pub/Sub topic answers; the embedded broker is always there."""
    connection = getattr(broker, "connection", None)
    if settings.broker == "rabbitmq" and connection is not None:
        return lambda: connection.connected.is_set() and not connection.is_closed
    if settings.broker == "pubsub":
        return _PubSubProbe(settings).check
    return lambda: True


class _PubSubProbe:
    """Asks the emulator / Pub/Sub for the topic, with its own client (created on first use)."""

    def __init__(self, settings: Settings) -> None:
        from infra.pubsub.topology import Topology

        self._topic = Topology.from_settings(settings).topic_path
        self._client: Any = None

    def _get(self) -> bool:
        if self._client is None:
            from google.cloud import pubsub_v1

            self._client = pubsub_v1.PublisherClient()
        self._client.get_topic(topic=self._topic, timeout=2.0)
        return True

    async def check(self) -> bool:
        return await asyncio.to_thread(self._get)
