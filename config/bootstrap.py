"""How a process starts and stops: the container opened with logging, the broker and the store reached,
the ops server made ready, the worker drained, the HTTP servers started; and the one-shot operations
(publish, dead letters, maintenance, set-up, reading incidents) each inside its own container.

The CLI (app.py), the tests, the benchmarks and the HTTP servers all start through here, so there is one
start-up and one shutdown order to read (docs/architecture.md). Nothing here prints except the HTTP
servers' "listening on" lines; a one-shot operation the broker or the store refuses raises
:class:`config.cli_output.Refused`, which the CLI shows as one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from application.dispatcher import Dispatcher, Observer
from application.errors import BrokerOperationError, IncidentdError
from application.messages import TYPE_ATTR
from application.ports import Broker, DeadLetter, DeadLetterQueue, ReplayReport
from application.worker import run_worker
from common.redact import redact
from common.startup import StartupError, Stopped, wait_for
from config.cli_output import Refused, version
from config.container import Container
from config.settings import Settings

if TYPE_CHECKING:
    from application.incidents import Incident
    from infra.ops import OpsServer
    from infra.web.server import AuthPlan, HttpServer

T = TypeVar("T")


@asynccontextmanager
async def open_container(settings: Settings, observers: Sequence[Observer] = ()) -> AsyncIterator[Container]:
    """The container with logging configured (``observers``: outcome observers of the caller's own, beside
    the metrics); every resource it started is closed on the way out."""
    container = Container(settings=settings, extra_observers=list(observers))
    container.logging()
    try:
        yield container
    finally:
        await container.shutdown_resources()  # type: ignore[misc]


# --- the long-running worker --------------------------------------------------------------------------


async def worker(settings: Settings) -> None:
    """``worker``: consume until SIGTERM / SIGINT, then drain within ``shutdown_timeout``."""
    async with open_container(settings) as container:
        stop = stop_on_signals()
        log_start(settings, ops=True)
        ops = await start_ops(settings, container)
        try:
            broker = await connect(settings, container, stop)
        except (Stopped, StartupError) as exc:
            if ops is not None:
                await ops.stop()
            if isinstance(exc, StartupError):
                raise
            return  # SIGTERM while waiting: nothing was started, nothing to drain
        # A Future, not the object: the dispatcher's dependencies are async Resources.
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        if ops is not None:
            await ops_ready(ops, container, broker, dispatcher)
        # retention and archival every maintenance_interval (docs/operations.md)
        await container.maintenance_loop()  # type: ignore[misc]
        report = await run_worker(
            broker.subscriber,
            dispatcher,
            stop=stop,
            shutdown_timeout=settings.shutdown_timeout,
            on_stopping=[ops.mark_stopping] if ops else [],
        )
        if ops is not None:
            container.metrics().drained(report.seconds)
            await ops.stop()


@dataclass(frozen=True)
class FeedReport:
    """What ``worker --from`` did: the outcome counts, the newest incidents (and how many there are),
    and why it stopped early, if it did."""

    counts: dict[str, int]
    incidents: list[Incident]
    total: int
    finished: int
    in_flight: int
    dead_lettered: int
    failed: Exception | None
    interrupted: bool


async def feed(settings: Settings, source: Path, *, limit: int) -> FeedReport:
    """``worker --from``: publish the file (``-``: stdin) into this process's own embedded broker,
    process it, drain. Pinned to the memory broker, so that a pod's INCIDENTD_BROKER=rabbitmq does not
    publish the file into the real queue; the store stays as set."""
    from infra.memory.feed import Feed, report_progress, stream_lines

    configured, settings = settings.broker, settings.model_copy(update={"broker": "memory"})
    fed = Feed(window=max(8 * settings.concurrency, 1000))
    async with open_container(settings, [fed.observe]) as container:
        log = structlog.get_logger("incidentd.feed")
        if configured != "memory":
            log.info("feed.broker_pinned", configured=configured, used="memory")
        broker = await container.broker()
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        stop, interrupted = asyncio.Event(), asyncio.Event()

        def interrupt() -> None:
            interrupted.set()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, interrupt)
        await broker.setup()
        stdin = str(source) == "-"
        stream = sys.stdin.buffer if stdin else await asyncio.to_thread(source.open, "rb")
        try:
            feeding = asyncio.create_task(
                fed.run(broker, stream_lines(stream, batch=1 if stdin else 500), stop)
            )
            feeding.add_done_callback(lambda _: stop.set())
            size = None if stdin else (await asyncio.to_thread(source.stat)).st_size
            position = (lambda: 0) if stdin else stream.tell  # how far the reader is, for the progress bar
            progress = asyncio.create_task(report_progress(fed, sys.stderr.isatty(), size, position))
            await run_worker(
                broker.subscriber, dispatcher, stop=stop, shutdown_timeout=settings.shutdown_timeout
            )
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
            feeding.cancel()
            [failed] = await asyncio.gather(feeding, return_exceptions=True)
        finally:
            if not stdin:
                stream.close()
        store = await container.store()
        found, total = await store.list(limit=limit), await store.count()
        counts = fed.counts()
        log.info("feed.finished", **counts)
        failed = failed if isinstance(failed, Exception) else None  # reading or publishing failed
        if failed is not None:
            log.error("feed.failed", error=f"{type(failed).__name__}: {failed}")
        return FeedReport(
            counts, found, total, fed.finished, fed.in_flight, fed.dead_lettered, failed, interrupted.is_set()
        )


def log_start(settings: Settings, *, ops: bool) -> None:
    """One line saying what this worker is about to use (secrets masked)."""
    source = {"rabbitmq": settings.rabbitmq_queue, "pubsub": settings.pubsub_subscription}
    store = {"postgres": redact(settings.postgres_dsn), "sqlite": str(settings.sqlite_path)}
    structlog.get_logger("incidentd.worker").info(
        "worker.starting", version=version(), broker=settings.broker,
        queue=source.get(settings.broker, "(in-process)"), store=settings.store,
        store_at=store[settings.store], schema=settings.postgres_schema or None,
        concurrency=settings.concurrency,
        ops=f"{settings.ops_host}:{settings.ops_port}" if ops and settings.ops_enabled else None,
        startup_timeout=settings.startup_timeout,
    )  # fmt: skip


def stop_on_signals() -> asyncio.Event:
    """Set on SIGTERM or SIGINT: the signal to stop taking work."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    return stop


# --- reaching the servers -------------------------------------------------------------------------------


def targets(settings: Settings) -> tuple[str, str]:
    """Where the broker and the store are, for start-up lines and errors (masked when shown)."""
    broker = {
        "rabbitmq": settings.rabbitmq_url,
        "pubsub": os.environ.get("PUBSUB_EMULATOR_HOST") or f"projects/{settings.pubsub_project}",
        "memory": "(in-process)",
    }[settings.broker]
    store = settings.postgres_dsn if settings.store == "postgres" else str(settings.sqlite_path)
    return broker, store


async def connect(settings: Settings, container: Container, stop: asyncio.Event | None = None) -> Broker:
    """Reach the broker (and declare its topology) and the store, each retried with backoff for up to
    ``startup_timeout`` seconds in all (common/startup.py); StartupError after that."""
    broker_at, store_at = targets(settings)
    deadline = asyncio.get_running_loop().time() + settings.startup_timeout

    def left() -> float:
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    async def broker_up() -> Broker:
        broker = await reachable_broker(container, timeout=min(max(left() / 2, 1.0), 10.0))
        await broker.setup()
        return broker

    broker = await wait_for("broker", broker_at, broker_up, timeout=left(), stop=stop)
    await wait_for("store", store_at, container.store, timeout=left(), stop=stop)
    return broker


async def reachable_broker(container: Container, timeout: float = 10.0) -> Broker:
    """The broker, reachable: Pub/Sub's clients connect lazily and retry for a minute in silence, so one
    bounded call (``ping``) makes a wrong or unreachable endpoint an error within ``timeout``."""
    broker: Broker = await container.broker()
    ping = getattr(broker, "ping", None)
    if ping is not None:
        await ping(timeout=timeout)
    return broker


# --- the ops server (/healthz, /readyz, /metrics; docs/operations.md) ---------------------------------


class Starting(Exception):
    """The /readyz reason while the worker is still connecting."""


async def start_ops(settings: Settings, container: Container) -> OpsServer | None:
    """The ops server of a long-running worker, started before the broker and store are reached:
    /healthz is 200 and /readyz 503 while the worker waits."""
    if not settings.ops_enabled:
        return None
    from infra.ops import OpsServer

    metrics = container.metrics()

    def starting() -> bool:
        raise Starting("waiting for the broker and the store")

    server = OpsServer(
        metrics.registry,
        host=settings.ops_host,
        port=settings.ops_port,
        checks={"startup": starting},
        loop_lag_threshold=settings.ops_loop_lag_threshold,
        on_lag=metrics.loop_lag.set,
    )
    await server.start()
    return server


async def ops_ready(ops: OpsServer, container: Container, broker: Broker, dispatcher: Dispatcher) -> None:
    """Connected: readiness now follows the broker connection and the store's ping."""
    metrics = container.metrics()
    metrics.track_in_flight(lambda: dispatcher.in_flight - dispatcher.waiting)
    metrics.track_waiting(lambda: dispatcher.waiting)
    metrics.track_settle_failures(lambda: dispatcher.settle_failures)
    store = await container.store()
    ops.add_check("broker", lambda: broker.subscriber.connected)
    ops.add_check("store", store.ping)
    ops.remove_check("startup")
    # Refreshes incidents-active from the store while the worker runs (an async Resource: awaitable).
    await container.incident_gauge()  # type: ignore[misc]


# --- the HTTP servers: ingest, incident API, dashboard (infra/web; docs/ingest.md, docs/api.md) ----------


def embedded(settings: Settings) -> Settings:
    """``run``'s settings: the HTTP and ops servers bind 127.0.0.1 unless their host was set."""
    local = {name: "127.0.0.1" for name in ("http_host", "ops_host") if name not in settings.model_fields_set}
    return settings.model_copy(update=local)


async def front_door(
    settings: Settings,
    container: Container,
    broker: Broker,
    auth: AuthPlan,
    store: Any = None,
    shutdown_timeout: float | None = None,
) -> HttpServer:
    """Start the HTTP application on the broker's publisher; log (and say) where and who may call.
    With ``store``, it also serves the incident API and the dashboard (docs/api.md). It gets
    ``shutdown_timeout`` (by default all of ``settings.shutdown_timeout``) to answer what is in flight."""
    from infra.web.app import make_app
    from infra.web.server import HttpServer, build_deps

    deps = build_deps(settings, broker, container.metrics().registry, auth.tokens, container.handlers())
    deps = replace(deps, store=store, refresh_seconds=settings.http_dashboard_refresh)
    server = HttpServer(
        make_app(deps),
        settings.http_host,
        settings.http_port,
        shutdown_timeout=settings.shutdown_timeout if shutdown_timeout is None else shutdown_timeout,
    )
    await server.start()
    tokens = auth.tokens
    if tokens is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: tokens.reload(force=True))
    url = f"http://{settings.http_host}:{server.port}"
    structlog.get_logger("incidentd.http").info("http.listening", url=url, auth=auth.says)
    print(f"incidentd: ingest on {url}/v1/... ({auth.says})", file=sys.stderr, flush=True)
    if store is not None:
        print(f"incidentd: dashboard on {url}/  (API: {url}/v1/incidents)", file=sys.stderr, flush=True)
    return server


async def ingest(settings: Settings, auth: AuthPlan, with_store: bool = False) -> None:
    """``ingest`` (and with ``with_store``, ``serve``): the HTTP front door on a real broker until
    SIGTERM; then not ready, stop accepting, answer what is in flight."""
    from infra.ops import OpsServer
    from infra.web.server import broker_check

    async with open_container(settings) as container:
        stop = stop_on_signals()
        broker_at, store_at = targets(settings)
        try:  # like the worker: wait for the broker (and the store) up to startup_timeout, then one line
            broker = await wait_for(
                "broker",
                broker_at,
                lambda: reachable_broker(container),
                timeout=settings.startup_timeout,
                stop=stop,
            )
            store = (
                await wait_for(
                    "store", store_at, container.store, timeout=settings.startup_timeout, stop=stop
                )
                if with_store
                else None
            )
        except Stopped:
            return  # SIGTERM while waiting: nothing was served
        server = await front_door(settings, container, broker, auth, store)
        metrics = container.metrics()
        ops = OpsServer(
            metrics.registry, host=settings.ops_host, port=settings.ops_port,
            checks={"broker": broker_check(broker, settings)} | ({"store": store.ping} if store else {}),
            loop_lag_threshold=settings.ops_loop_lag_threshold, on_lag=metrics.loop_lag.set,
        )  # fmt: skip
        if settings.ops_enabled:
            await ops.start()
        await stop.wait()
        ops.mark_stopping()  # /readyz 503 from now on
        await server.stop()  # stop accepting; answer the requests in flight (each waits for its confirm)
        await ops.stop()


async def run_all(settings: Settings, auth: AuthPlan) -> None:
    """``run``: the HTTP front door and the worker in one process. On SIGTERM the door closes first
    (answering what is in flight), then the worker drains: one ``shutdown_timeout`` for both, a third
    for the door (its requests wait at most ``http_publish_timeout`` each), the rest for the worker."""
    door_share = settings.shutdown_timeout / 3
    async with open_container(settings) as container:
        ops = await start_ops(settings, container)
        broker = await connect(settings, container)
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        if ops is not None:
            await ops_ready(ops, container, broker, dispatcher)
        await container.maintenance_loop()  # type: ignore[misc]
        server = await front_door(settings, container, broker, auth, await container.store(), door_share)
        term, stop = stop_on_signals(), asyncio.Event()

        async def front_door_first() -> None:
            await term.wait()
            if ops is not None:
                ops.mark_stopping()
            await server.stop()
            stop.set()

        closing = asyncio.create_task(front_door_first())
        report = await run_worker(
            broker.subscriber, dispatcher, stop=stop, shutdown_timeout=settings.shutdown_timeout - door_share
        )
        term.set()  # the worker may also have stopped on its own
        await closing
        if ops is not None:
            container.metrics().drained(report.seconds)
            await ops.stop()


# --- one-shot operations ----------------------------------------------------------------------------------


async def publish(settings: Settings, body: bytes, type_name: str, attributes: dict[str, str]) -> str:
    """Publish one message of ``type_name``; its message id once the broker confirmed it."""
    async with open_container(settings) as container:
        broker = await reachable_broker(container)
        try:
            return await broker.publisher.publish(body, attributes | {TYPE_ATTR: type_name})
        except BrokerOperationError as exc:  # not confirmed
            raise Refused(str(exc)) from None


async def incident_command(settings: Settings, type_name: str, incident_id: Any, note: str) -> str:
    """Publish an incident command like any other source: the worker changes the store, not this process."""
    actor = os.environ.get("USER") or "cli"
    body = json.dumps({"incident_id": str(incident_id), "note": note, "actor": actor}).encode()
    return await publish(settings, body, type_name, {})


async def incidents(
    settings: Settings, status: str | None, service: str | None, limit: int
) -> tuple[list[Incident], int]:
    """The newest ``limit`` incidents that match, and how many match in all."""
    async with open_container(settings) as container:
        store = await container.store()
        found = await store.list(status=status, service=service, limit=limit)
        return found, await store.count(status=status, service=service or None)


async def incident(settings: Settings, incident_id: Any) -> Incident | None:
    async with open_container(settings) as container:
        store = await container.store()
        return await store.get(incident_id)  # type: ignore[no-any-return]


async def dead_letters(settings: Settings, operation: Callable[[DeadLetterQueue], Awaitable[T]]) -> T:
    """Run ``operation`` on the broker's dead-letter destination."""
    async with open_container(settings) as container:
        broker = await reachable_broker(container)
        try:
            return await operation(broker.dead_letters)
        except BrokerOperationError as exc:
            raise Refused(str(exc)) from None


async def list_dead_letters(settings: Settings, limit: int | None = None) -> list[DeadLetter]:
    return await dead_letters(settings, lambda q: q.list(limit=limit))


async def replay(settings: Settings, *, limit: int | None, dry_run: bool) -> ReplayReport:
    """Re-validate dead letters as the worker would decode them (incident.analyze included) and publish
    the valid ones back to the main destination."""
    from application.analysis import with_analysis
    from application.factory import CommandFactory
    from application.handlers import HANDLERS

    factory = CommandFactory(with_analysis(HANDLERS))
    return await dead_letters(
        settings, lambda q: q.replay(validate=factory.decode, limit=limit, dry_run=dry_run)
    )


async def maintain(settings: Settings) -> str:
    """One maintenance run (retention, archival); what it did, in one line."""
    async with open_container(settings) as container:
        runner = await container.maintenance()  # type: ignore[misc]
        try:
            return (await runner.run()).summary()  # type: ignore[no-any-return]
        except IncidentdError as exc:  # e.g. the archive bucket is missing
            raise Refused(str(exc)) from None


async def set_up(settings: Settings) -> None:
    """The broker's topology and the store's schema, waiting for the servers like a worker (the
    Deployment's set-up Job)."""
    async with open_container(settings) as container:
        await connect(settings, container)


def secret_problems(settings: Settings) -> list[str]:
    """Every secret file the settings name that cannot be read, one line each (``config check``)."""
    from infra.secrets import read_secret

    problems = []
    for name in ("clickhouse_password", "github_token", "slack_default_webhook_url"):
        try:
            read_secret(getattr(settings, name), getattr(settings, f"{name}_file"))
        except ValueError as exc:
            problems.append(f"invalid setting {name}_file: {exc}")
    for number, route in enumerate(settings.slack_routes):
        try:
            read_secret(route.webhook_url, route.webhook_url_file)
        except ValueError as exc:
            problems.append(f"invalid setting slack_routes.{number}.webhook_url_file: {exc}")
    return problems
