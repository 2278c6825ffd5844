"""incidentd's command line: ``python app.py --help``."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import structlog

from application.dispatcher import Dispatcher
from application.errors import BrokerOperationError, IncidentdError
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident
from application.messages import TYPE_ATTR
from application.ports import Broker, DeadLetterQueue
from application.worker import run_worker
from common.redact import describe, redact
from common.startup import StartupError, Stopped, wait_for
from common.text import printable
from config.container import Container
from config.settings import Settings, SettingsError, load_with_origins, shown

if TYPE_CHECKING:
    from infra.ops import OpsServer
    from infra.web.server import AuthPlan, HttpServer

T = TypeVar("T")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("incidentd")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class _Cli(click.Group):
    """Every failure of every command is one line (a JSON log line once JSON logging is set up, else
    ``incidentd: ...``) and exit 1; the traceback only with ``--debug``. Ctrl-C is exit 130, quietly."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            ctx.exit(130)
        except Exception as exc:
            _fail(exc, debug=bool(ctx.params.get("debug")), command=ctx.invoked_subcommand or "")
            ctx.exit(1)


def _fail(exc: Exception, *, debug: bool, command: str) -> None:
    message = str(exc) if isinstance(exc, StartupError) else describe(exc)
    if structlog.is_configured():
        structlog.get_logger("incidentd").error(
            "command.failed", command=command, error=message, exc_info=exc if debug else None
        )
        return
    if debug:
        import traceback

        traceback.print_exception(exc)
    click.echo(f"incidentd: {message}", err=True)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file of settings (environment variables INCIDENTD_* take precedence).",
)
@click.option("--debug", is_flag=True, help="On failure, show the traceback (without it: one line).")
@click.version_option(_version(), "--version", prog_name="incidentd", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None, debug: bool) -> None:
    """incidentd: turns operational events into incidents and actions."""
    ctx.obj = config_file


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    return _settings_with_origins(ctx, **overrides)[0]


@asynccontextmanager
async def _container(settings: Settings) -> AsyncIterator[Container]:
    container = Container(settings=settings)
    container.logging()
    try:
        yield container
    finally:
        await container.shutdown_resources()  # type: ignore[misc]


# --- worker -----------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--from",
    "from_file",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path),
    help="Feed this JSON-lines file (- for stdin) into the embedded broker, process it, print a summary, "
    "exit. Uses the embedded broker whatever INCIDENTD_BROKER says.",
)
@click.option("--strict", is_flag=True, help="With --from: exit 1 if any message was dead-lettered.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="With --from: incidents listed in the summary.",
)
@click.pass_context
def worker(ctx: click.Context, from_file: Path | None, strict: bool, limit: int) -> None:
    """Consume messages until SIGTERM / SIGINT, then drain and exit 0."""
    if from_file is None:
        asyncio.run(_worker(_settings(ctx)))
        return
    settings = _settings(ctx)
    # The file is fed into this process's own queue: pinned to the embedded broker, so that a pod's
    # INCIDENTD_BROKER=rabbitmq does not publish the file into the real queue. The store stays as set.
    configured = settings.broker
    settings = settings.model_copy(update={"broker": "memory"})
    status = asyncio.run(_feed_worker(settings, from_file, strict=strict, limit=limit, configured=configured))
    sys.exit(status)


async def _worker(settings: Settings) -> None:
    async with _container(settings) as container:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        _log_start(settings, ops=True)
        ops = await _start_ops(settings, container)
        try:
            broker = await _connect(settings, container, stop)
        except (Stopped, StartupError) as exc:
            if ops is not None:
                await ops.stop()
            if isinstance(exc, StartupError):
                raise
            return  # SIGTERM while waiting: nothing was started, nothing to drain
        # A Future, not the object: the dispatcher's dependencies are async Resources.
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        if ops is not None:
            await _ops_ready(ops, container, broker, dispatcher)
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


async def _feed_worker(settings: Settings, source: Path, *, strict: bool, limit: int, configured: str) -> int:
    """``worker --from``: feed, drain, print the summary; the exit status (130 when interrupted)."""
    from infra.memory.feed import Feed, report_progress, stream_lines

    async with _container(settings) as container:
        log = structlog.get_logger("incidentd.feed")
        if configured != "memory":
            log.info("feed.broker_pinned", configured=configured, used="memory")
        broker = await container.broker()
        feed = Feed(broker, window=max(8 * settings.concurrency, 1000))
        container.extra_observers.override([feed.observe])
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        stop, interrupted = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def interrupt() -> None:
            interrupted.set()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, interrupt)
        await broker.setup()
        stdin = str(source) == "-"
        stream = sys.stdin.buffer if stdin else await asyncio.to_thread(source.open, "rb")
        try:
            feeding = asyncio.create_task(feed.run(stream_lines(stream, batch=1 if stdin else 500), stop))
            feeding.add_done_callback(lambda _: stop.set())
            size = None if stdin else (await asyncio.to_thread(source.stat)).st_size
            progress = asyncio.create_task(
                report_progress(feed, sys.stderr.isatty(), size, _position(stream, stdin))
            )
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
        found, total_incidents = await store.list(limit=limit), await store.count()
        counts = feed.counts()
        log.info("feed.finished", **counts)
        click.echo(_summary(counts, found, total_incidents))
        if isinstance(failed, Exception):  # reading the file or publishing failed: say so, exit 1
            log.error("feed.failed", error=f"{type(failed).__name__}: {failed}")
            click.echo(f"stopped: {failed}; {feed.finished:,} processed, {feed.in_flight:,} not processed")
            return 1
        if interrupted.is_set():
            click.echo(f"interrupted: {feed.finished:,} processed, {feed.in_flight:,} not processed")
            return 130
        return 1 if strict and feed.dead_lettered else 0


def _position(stream: Any, stdin: bool) -> Callable[[], int]:
    """How far into the file the reader is (for the progress bar); 0 for stdin."""
    return (lambda: 0) if stdin else stream.tell


def _log_start(settings: Settings, *, ops: bool) -> None:
    """One line saying what this worker is about to use (secrets masked)."""
    source = {"rabbitmq": settings.rabbitmq_queue, "pubsub": settings.pubsub_subscription}
    store = {"postgres": redact(settings.postgres_dsn), "sqlite": str(settings.sqlite_path)}
    structlog.get_logger("incidentd.worker").info(
        "worker.starting", version=_version(), broker=settings.broker,
        queue=source.get(settings.broker, "(in-process)"), store=settings.store,
        store_at=store[settings.store], schema=settings.postgres_schema or None,
        concurrency=settings.concurrency,
        ops=f"{settings.ops_host}:{settings.ops_port}" if ops and settings.ops_enabled else None,
        startup_timeout=settings.startup_timeout,
    )  # fmt: skip


def _targets(settings: Settings) -> tuple[str, str]:
    """Where the broker and the store are, for start-up lines and errors (masked when shown)."""
    broker = {
        "rabbitmq": settings.rabbitmq_url,
        "pubsub": os.environ.get("PUBSUB_EMULATOR_HOST") or f"projects/{settings.pubsub_project}",
        "memory": "(in-process)",
    }[settings.broker]
    store = settings.postgres_dsn if settings.store == "postgres" else str(settings.sqlite_path)
    return broker, store


async def _connect(settings: Settings, container: Container, stop: asyncio.Event | None = None) -> Broker:
    """Reach the broker (and declare its topology) and the store, each retried with backoff for up to
    ``startup_timeout`` seconds in all (common/startup.py); StartupError after that."""
    broker_at, store_at = _targets(settings)
    deadline = asyncio.get_running_loop().time() + settings.startup_timeout

    def left() -> float:
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    async def broker_up() -> Broker:
        broker = await _broker(container, timeout=min(max(left() / 2, 1.0), 10.0))
        await broker.setup()
        return broker

    broker = await wait_for("broker", broker_at, broker_up, timeout=left(), stop=stop)
    await wait_for("store", store_at, container.store, timeout=left(), stop=stop)
    return broker


async def _broker(container: Container, timeout: float = 10.0) -> Broker:
    """The broker, reachable: Pub/Sub's clients connect lazily and retry for a minute in silence, so one
    bounded call (``ping``) makes a wrong or unreachable endpoint an error within ``timeout``."""
    broker: Broker = await container.broker()
    ping = getattr(broker, "ping", None)
    if ping is not None:
        await ping(timeout=timeout)
    return broker


async def _start_ops(settings: Settings, container: Container) -> OpsServer | None:
    """The ops server (/healthz, /readyz, /metrics) of a long-running worker; docs/operations.md. Started
    before the broker and store are reached: /healthz is 200 and /readyz 503 while the worker waits."""
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


class Starting(Exception):
    """The /readyz reason while the worker is still connecting."""


async def _ops_ready(ops: OpsServer, container: Container, broker: Broker, dispatcher: Dispatcher) -> None:
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


def _summary(counts: dict[str, int], incidents: list[Incident], total: int) -> str:
    by_status = collections.Counter(i.status for i in incidents)
    lines = [
        f"messages: {counts['acked']:,} acked, {counts['dead_lettered']:,} dead-lettered, "
        f"{counts['retried']:,} retried",
        "incidents: " + ", ".join(f"{n:,} {s}" for s, n in sorted(by_status.items()))
        if incidents
        else "incidents: none",
    ]
    if total > len(incidents):
        lines.append(f"showing the newest {len(incidents):,} of {total:,} incidents (--limit)")
    return "\n".join([*lines, *_table(incidents)])


def _table(incidents: list[Incident]) -> list[str]:
    rows = [f"{'ID':36}  {'STATUS':12}  {'SEVERITY':8}  {'SERVICE':16}  {'N':>3}  TITLE"]
    for i in incidents:
        rows.append(
            f"{i.id!s:36}  {i.status:12}  {i.severity:8}  {printable(i.service)[:16]:16}  "
            f"{i.occurrences:>3}  {printable(i.title)}"
        )
    return rows


# --- HTTP ingest: `ingest` and the all-in-one `run` (infra/web; docs/ingest.md) ----------------------


@cli.command()
@click.pass_context
def ingest(ctx: click.Context) -> None:
    """Serve the HTTP ingest until SIGTERM: webhooks in, validated, published; 202 only once confirmed."""
    settings = _settings(ctx)
    if settings.broker == "memory":
        raise click.UsageError(
            "the memory broker lives inside one process; use 'run' (ingest and worker in one process), "
            "or set INCIDENTD_BROKER=rabbitmq or pubsub"
        )
    asyncio.run(_ingest(settings, _http_auth(settings, settings.http_host)))


@cli.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Serve the HTTP ingest, the incident API and the dashboard until SIGTERM (reads the store; every
    change is published for the workers). The ingest's rules apply: tokens file, real broker."""
    settings = _settings(ctx)
    if settings.broker == "memory":
        raise click.UsageError(
            "the memory broker lives inside one process; use 'run' (everything in one process), "
            "or set INCIDENTD_BROKER=rabbitmq or pubsub"
        )
    asyncio.run(_ingest(settings, _http_auth(settings, settings.http_host), with_store=True))


@cli.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Everything in one process (the embedded default: memory broker, SQLite): the HTTP ingest and the
    worker. Binds 127.0.0.1 unless INCIDENTD_HTTP_HOST (INCIDENTD_OPS_HOST for the probes and metrics) is
    set; SIGTERM / Ctrl-C stops both."""
    settings = _settings(ctx)
    local = {name: "127.0.0.1" for name in ("http_host", "ops_host") if name not in settings.model_fields_set}
    settings = settings.model_copy(update=local)
    host = settings.http_host
    asyncio.run(_run(settings, _http_auth(settings, host)))


def _http_auth(settings: Settings, host: str) -> AuthPlan:
    from infra.web.server import RefusedToStart, plan_auth

    try:
        return plan_auth(settings, host)
    except RefusedToStart as exc:
        click.echo(f"incidentd: {exc}", err=True)
        sys.exit(2)


async def _front_door(
    settings: Settings, container: Container, broker: Broker, auth: AuthPlan, store: Any = None
) -> HttpServer:
    """Start the HTTP application on the broker's publisher; log (and say) where and who may call.
    With ``store``, it also serves the incident API and the dashboard (docs/api.md)."""
    import dataclasses

    import structlog

    from infra.web.app import make_app
    from infra.web.server import HttpServer, build_deps

    deps = build_deps(settings, broker, container.metrics().registry, auth.tokens, container.handlers())
    deps = dataclasses.replace(deps, store=store, refresh_seconds=settings.http_dashboard_refresh)
    server = HttpServer(
        make_app(deps), settings.http_host, settings.http_port, shutdown_timeout=settings.shutdown_timeout
    )
    await server.start()
    tokens = auth.tokens
    if tokens is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: tokens.reload(force=True))
    url = f"http://{settings.http_host}:{server.port}"
    structlog.get_logger("incidentd.http").info("http.listening", url=url, auth=auth.says)
    click.echo(f"incidentd: ingest on {url}/v1/... ({auth.says})", err=True)
    if store is not None:
        click.echo(f"incidentd: dashboard on {url}/  (API: {url}/v1/incidents)", err=True)
    return server


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    return stop


async def _ingest(settings: Settings, auth: AuthPlan, with_store: bool = False) -> None:
    from infra.ops import OpsServer
    from infra.web.server import broker_check

    async with _container(settings) as container:
        stop = _stop_on_signals()
        broker_at, store_at = _targets(settings)
        try:  # like the worker: wait for the broker (and the store) up to startup_timeout, then one line
            broker = await wait_for(
                "broker", broker_at, lambda: _broker(container), timeout=settings.startup_timeout, stop=stop
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
        server = await _front_door(settings, container, broker, auth, store)
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


async def _run(settings: Settings, auth: AuthPlan) -> None:
    async with _container(settings) as container:
        ops = await _start_ops(settings, container)
        broker = await _connect(settings, container)
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        if ops is not None:
            await _ops_ready(ops, container, broker, dispatcher)
        await container.maintenance_loop()  # type: ignore[misc]
        server = await _front_door(settings, container, broker, auth, await container.store())
        term, stop = _stop_on_signals(), asyncio.Event()

        async def front_door_first() -> None:
            """On SIGTERM: not ready, close the door (answering what is in flight), then drain the worker."""
            await term.wait()
            if ops is not None:
                ops.mark_stopping()
            await server.stop()
            stop.set()

        closing = asyncio.create_task(front_door_first())
        report = await run_worker(
            broker.subscriber, dispatcher, stop=stop, shutdown_timeout=settings.shutdown_timeout
        )
        term.set()  # the worker may also have stopped on its own
        await closing
        if ops is not None:
            container.metrics().drained(report.seconds)
            await ops.stop()


# --- publish ----------------------------------------------------------------------------------------


@cli.command()
@click.argument("type_name", metavar="TYPE")
@click.argument("source", type=click.File("rb"), default="-")
@click.option("--attribute", "-a", multiple=True, help="Extra attribute KEY=VALUE (repeatable).")
@click.pass_context
def publish(ctx: click.Context, type_name: str, source: Any, attribute: tuple[str, ...]) -> None:
    """Publish one JSON document from SOURCE (a file, or - for stdin) as a message of TYPE."""
    settings = _settings(ctx)
    if settings.broker == "memory":
        raise click.UsageError(
            "the memory broker lives inside one worker process; use 'worker --from FILE', "
            "or set INCIDENTD_BROKER=rabbitmq or pubsub"
        )
    body = source.read()
    try:
        json.loads(body)
    except ValueError as exc:
        raise click.BadParameter(f"not a JSON document: {exc}", param_hint="SOURCE") from None
    attributes = dict(a.split("=", 1) for a in attribute if "=" in a) | {TYPE_ATTR: type_name}
    click.echo(asyncio.run(_publish(settings, body, attributes)))


async def _publish(settings: Settings, body: bytes, attributes: dict[str, str]) -> str:
    async with _container(settings) as container:
        broker = await _broker(container)
        try:
            return await broker.publisher.publish(body, attributes)
        except BrokerOperationError as exc:  # not confirmed: say so, exit 1
            raise click.ClickException(str(exc)) from None


# --- incidents and dead letters ---------------------------------------------------------------------


@cli.group()
def incidents() -> None:
    """Read the incident store; acknowledge or resolve through the broker."""


@incidents.command("list")
@click.option("--status", type=click.Choice(["open", "acknowledged", "resolved"]))
@click.option("--service")
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True, help="The newest N.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, incidents with their timelines.")
@click.pass_context
def incidents_list(
    ctx: click.Context, status: str | None, service: str | None, limit: int, as_json: bool
) -> None:
    """List incidents by correlation group (the group of the newest incident first), newest first."""
    found, total = asyncio.run(_incidents(_settings(ctx), status, service, limit))
    if as_json:
        click.echo(json.dumps([i.model_dump(mode="json") for i in found], indent=2))
        if total > len(found):
            shown = f"showing the newest {len(found):,} of {total:,} incidents (--limit)"
            click.echo(f"incidentd: {shown}", err=True)
        return
    groups: dict[str, list[Incident]] = {}
    for incident in found:
        groups.setdefault(incident.correlation_group or str(incident.id), []).append(incident)
    for group, members in groups.items():
        first = members[0]
        scope = "/".join(x for x in (first.service, first.environment) if x) or "-"
        click.echo(f"group {printable(group[:8])}  {printable(scope)}  {len(members)} incident(s)")
        click.echo("\n".join("  " + row for row in _table(members)))
    if total > len(found):
        click.echo(f"showing the newest {len(found):,} of {total:,} incidents (--limit)")


async def _incidents(
    settings: Settings, status: str | None, service: str | None, limit: int
) -> tuple[list[Incident], int]:
    async with _container(settings) as container:
        store = await container.store()
        found = await store.list(status=status, service=service, limit=limit)
        return found, await store.count(status=status, service=service or None)


@incidents.command("show")
@click.argument("incident_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="The incident as JSON.")
@click.pass_context
def incidents_show(ctx: click.Context, incident_id: Any, as_json: bool) -> None:
    """Show one incident with its timeline (every transition: time, kind, actor, note, message)."""
    incident = asyncio.run(_incident(_settings(ctx), incident_id))
    if incident is None:
        raise click.ClickException(f"no incident {incident_id}")
    if as_json:
        click.echo(incident.model_dump_json(indent=2))
        return
    for name in ("id", "title", "status", "severity", "service", "environment", "source", "dedup_key",
                 "correlation_group", "assignee", "runbook_url", "occurrences", "created_at",
                 "acknowledged_at", "resolved_at", "predecessor"):  # fmt: skip
        value = getattr(incident, name)
        if value not in (None, ""):
            click.echo(f"{name:18} {printable(value)}")
    click.echo("timeline:")
    for entry in sorted(incident.timeline, key=lambda e: e.at):
        note = f"  {printable(entry.note)}" if entry.note else ""
        kind, actor = printable(entry.kind), printable(entry.actor)
        click.echo(f"  {entry.at.isoformat()}  {kind:14} {entry.status:12} {actor}{note}")
    _show_analysis(incident)


async def _incident(settings: Settings, incident_id: Any) -> Incident | None:
    async with _container(settings) as container:
        store = await container.store()
        return await store.get(incident_id)  # type: ignore[no-any-return]


def _incident_command(ctx: click.Context, type_name: str, incident_id: Any, note: str) -> None:
    """Publish the command like any other source: the worker changes the store, not this process."""
    settings = _settings(ctx)
    if settings.broker == "memory":
        raise click.UsageError(
            "the memory broker lives inside one worker process; use 'worker --from FILE', "
            "or set INCIDENTD_BROKER=rabbitmq or pubsub"
        )
    actor = os.environ.get("USER") or "cli"
    body = json.dumps({"incident_id": str(incident_id), "note": note, "actor": actor}).encode()
    click.echo(asyncio.run(_publish(settings, body, {TYPE_ATTR: type_name})))


def _publishing(verb: str, type_name: str) -> None:
    """``incidents ack|resolve ID [--note]``: publish ``type_name`` for the worker; print its message id."""

    @incidents.command(verb, help=f"Publish an {type_name} command for INCIDENT_ID; print its message id.")
    @click.argument("incident_id", type=click.UUID)
    @click.option("--note", default="", help="Kept on the incident's timeline.")
    @click.pass_context
    def command(ctx: click.Context, incident_id: Any, note: str) -> None:
        _incident_command(ctx, type_name, incident_id, note)


_publishing("ack", "incident.acknowledge")
_publishing("resolve", "incident.resolve")


_publishing("analyze", "incident.analyze")  # AI analysis (docs/ai.md); --note: a question for the model


def _show_analysis(incident: Incident) -> None:
    """The latest AI analysis of ``incidents show``: summary, causes with evidence, cited next steps."""
    from application.analysis import analyses

    done = [r for r in analyses(incident) if r.answer is not None]
    if not done:
        return
    record = done[-1]
    answer = record.answer
    assert answer is not None
    click.echo(
        f"analysis ({record.at.isoformat()}, {printable(record.model)}, {record.outcome};"
        " a suggestion, not an action):"
    )
    click.echo(f"  {printable(answer.summary)}")
    for cause in answer.probable_causes:
        click.echo(f"  cause ({cause.confidence:.0%}): {printable(cause.cause)}")
        for evidence in cause.evidence:
            click.echo(f"    evidence: {printable(evidence)}")
    for step in answer.next_steps:
        cites = f"  [{printable(', '.join(step.cites))}]" if step.cites else ""
        click.echo(f"  next: {printable(step.step)}{cites}")
    if answer.related_incidents:
        click.echo(f"  related: {printable(', '.join(answer.related_incidents))}")


@cli.group()
def dlq() -> None:
    """Inspect the dead-letter destination."""


@dlq.command("list")
@click.option("--limit", type=int, help="At most this many entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array: body, attributes, reason, attempts.")
@click.pass_context
def dlq_list(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """List dead-lettered messages, oldest first, with the reason each was dead-lettered."""
    letters = asyncio.run(_dead_letters(_settings(ctx), lambda q: q.list(limit=limit)))
    if as_json:
        click.echo(json.dumps([_letter_json(x) for x in letters], indent=2))
        return
    for x in letters:
        copies = f"  copies={x.copies}" if x.copies > 1 else ""
        click.echo(f"{printable(x.message_id)}  attempts={x.attempts}{copies}  {printable(x.reason)}")


@dlq.command("show")
@click.argument("message_id")
@click.pass_context
def dlq_show(ctx: click.Context, message_id: str) -> None:
    """Show one dead letter (body, attributes, reason) as JSON."""
    letters = asyncio.run(_dead_letters(_settings(ctx), lambda q: q.list()))
    found = [_letter_json(x) for x in letters if x.message_id == message_id]
    if not found:
        raise click.ClickException(f"no dead letter with message id {message_id}")
    click.echo(json.dumps(found[0], indent=2))


@dlq.command("replay")
@click.option("--limit", type=int, help="At most this many messages, oldest first.")
@click.option("--dry-run", is_flag=True, help="Report what would be replayed; change nothing.")
@click.pass_context
def dlq_replay(ctx: click.Context, limit: int | None, dry_run: bool) -> None:
    """Re-validate dead letters and publish the valid ones back to the main destination (attempt 1)."""
    from application.analysis import with_analysis

    factory = CommandFactory(with_analysis(HANDLERS))  # incident.analyze is replayable too
    report = asyncio.run(
        _dead_letters(
            _settings(ctx), lambda q: q.replay(validate=factory.decode, limit=limit, dry_run=dry_run)
        )
    )
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {len(report.replayed)}; left {len(report.invalid)} that would fail again")
    for message_id, why in report.invalid.items():
        click.echo(f"  {printable(message_id)}: {printable(why)}")


@dlq.command("purge")
@click.option("--limit", type=int, help="At most this many messages, oldest first.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(ctx: click.Context, limit: int | None, dry_run: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    if not (dry_run or yes):
        click.confirm("Delete dead letters for good?", abort=True)
    count = asyncio.run(_dead_letters(_settings(ctx), lambda q: q.purge(limit=limit, dry_run=dry_run)))
    click.echo(f"{'would delete' if dry_run else 'deleted'} {count}")


async def _dead_letters(settings: Settings, operation: Callable[[DeadLetterQueue], Awaitable[T]]) -> T:
    async with _container(settings) as container:
        broker = await _broker(container)
        try:
            return await operation(broker.dead_letters)
        except BrokerOperationError as exc:
            raise click.ClickException(str(exc)) from None


def _letter_json(letter: Any) -> dict[str, Any]:
    try:
        body: Any = letter.body.decode()
        encoding = "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(letter.body).decode(), "base64"
    return {
        "message_id": letter.message_id,
        "body": body,
        "body_encoding": encoding,
        "attributes": dict(letter.attributes),
        "reason": letter.reason,
        "error": letter.error,
        "attempts": letter.attempts,
        "first_seen": letter.first_seen.isoformat() if letter.first_seen else None,
        "dead_lettered_at": letter.dead_lettered_at.isoformat() if letter.dead_lettered_at else None,
        "copies": letter.copies,
    }


# --- maintenance ------------------------------------------------------------------------------------


@cli.command()
@click.pass_context
def maintenance(ctx: click.Context) -> None:
    """Prune old idempotency keys and (if enabled) archive old resolved incidents to S3, once.

    Safe to run at any time and to repeat; while another process runs it, this one does nothing.
    """
    click.echo(asyncio.run(_maintenance(_settings(ctx))))


async def _maintenance(settings: Settings) -> str:
    async with _container(settings) as container:
        runner = await container.maintenance()  # type: ignore[misc]
        try:
            return (await runner.run()).summary()  # type: ignore[no-any-return]
        except IncidentdError as exc:  # e.g. the archive bucket is missing: one line, exit 1
            raise click.ClickException(str(exc)) from None


@cli.command()
@click.pass_context
def setup(ctx: click.Context) -> None:
    """Create the broker's topology and the store's schema (idempotent)."""
    asyncio.run(_setup(_settings(ctx)))


async def _setup(settings: Settings) -> None:
    async with _container(settings) as container:
        await _connect(settings, container)  # waits for the servers, like a worker (the setup Job)
    click.echo(f"set up broker={settings.broker} store={settings.store}")


# --- configuration ----------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Show or check the effective settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: name -> {value, source}.")
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Every setting's effective value (secrets masked) and where it came from: environment, secrets
    file, config file or default."""
    settings, origins = _settings_with_origins(ctx)
    values = shown(settings)
    if as_json:
        click.echo(json.dumps({k: {"value": v, "source": origins[k]} for k, v in values.items()}, indent=2))
        return
    for name, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        click.echo(f"{name:36} {text}  ({origins[name]})")


@config.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the settings (and read the secret files they name) without starting anything: exit 0
    and "ok", or exit 2 with one line per problem."""
    settings, _ = _settings_with_origins(ctx)
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
    for line in problems:
        click.echo(f"incidentd: {line}", err=True)
    if problems:
        sys.exit(2)
    click.echo(f"ok: broker={settings.broker} store={settings.store}")


def _settings_with_origins(ctx: click.Context, **overrides: Any) -> tuple[Settings, dict[str, str]]:
    """The settings, or every problem with them on stderr (one line each) and exit 2."""
    try:
        return load_with_origins(ctx.obj, **overrides)
    except SettingsError as exc:
        for line in exc.problems:
            click.echo(f"incidentd: {line}", err=True)
        sys.exit(2)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
