"""incidentd's command line: ``python app.py --help``."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from application.dispatcher import Dispatcher
from application.errors import BrokerOperationError
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident
from application.messages import TYPE_ATTR, Message, Outcome
from application.ports import Broker, DeadLetterQueue
from application.worker import run_worker
from config.container import Container
from config.settings import Settings, SettingsError, load

if TYPE_CHECKING:
    from infra.ops import OpsServer
    from infra.web.server import AuthPlan, HttpServer

T = TypeVar("T")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file of settings (environment variables INCIDENTD_* take precedence).",
)
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None) -> None:
    """incidentd: turns operational events into incidents and actions."""
    ctx.obj = config_file


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        return load(ctx.obj, **overrides)
    except SettingsError as exc:
        click.echo(f"incidentd: {exc}", err=True)
        sys.exit(2)


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
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Feed this JSON-lines file into the embedded broker, process it, print a summary, exit.",
)
@click.pass_context
def worker(ctx: click.Context, from_file: Path | None) -> None:
    """Consume messages until SIGTERM / SIGINT, then drain and exit 0."""
    settings = _settings(ctx, broker="memory") if from_file else _settings(ctx)
    asyncio.run(_worker(settings, from_file))


async def _worker(settings: Settings, from_file: Path | None) -> None:
    async with _container(settings) as container:
        broker: Broker = await container.broker()
        counts: collections.Counter[str] = collections.Counter()
        container.observers.add_args(_counter(counts))
        # A Future, not the object: the dispatcher's dependencies are async Resources.
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await broker.setup()
        if from_file is not None:
            lines = (await asyncio.to_thread(from_file.read_bytes)).splitlines()
            for body, attributes in _read_jsonl(lines):
                await broker.publisher.publish(body, attributes)
            waiter = asyncio.create_task(broker.wait_idle())  # type: ignore[attr-defined]
            waiter.add_done_callback(lambda _: stop.set())
        ops = await _start_ops(settings, container, broker, dispatcher) if from_file is None else None
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
        if from_file is not None:
            store = await container.store()
            click.echo(_summary(counts, await store.list()))


async def _start_ops(
    settings: Settings, container: Container, broker: Broker, dispatcher: Dispatcher
) -> OpsServer | None:
    """The ops server (/healthz, /readyz, /metrics) of a long-running worker; docs/operations.md."""
    if not settings.ops_enabled:
        return None
    from infra.ops import OpsServer

    metrics = container.metrics()
    metrics.track_in_flight(lambda: dispatcher.in_flight)
    store = await container.store()
    server = OpsServer(
        metrics.registry,
        host=settings.ops_host,
        port=settings.ops_port,
        checks={"broker": lambda: broker.subscriber.connected, "store": store.ping},
        loop_lag_threshold=settings.ops_loop_lag_threshold,
        on_lag=metrics.loop_lag.set,
    )
    await server.start()
    # Refreshes incidents-active from the store while the worker runs (an async Resource: awaitable).
    await container.incident_gauge()  # type: ignore[misc]
    return server


def _counter(counts: collections.Counter[str]) -> Any:
    def observe(message: Message, command_type: str, outcome: Outcome, duration: float) -> None:
        counts[outcome.disposition.value] += 1

    return observe


def _read_jsonl(lines: Iterable[bytes]) -> Iterable[tuple[bytes, dict[str, str]]]:
    """Each line is ``{"type", "attributes", "data"}`` or a raw payload; a line that is not JSON is
    published as it is, so that it is dead-lettered with the reason rather than lost."""
    for line in lines:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            yield line, {}
            continue
        if isinstance(doc, dict) and "data" in doc and doc.keys() <= {"type", "attributes", "data"}:
            attributes = {str(k): str(v) for k, v in (doc.get("attributes") or {}).items()}
            if doc.get("type"):
                attributes[TYPE_ATTR] = str(doc["type"])
            yield json.dumps(doc["data"]).encode(), attributes
        else:
            yield line, {}


def _summary(counts: collections.Counter[str], incidents: list[Incident]) -> str:
    by_status = collections.Counter(i.status for i in incidents)
    lines = [
        f"messages: {counts['ack']} acked, {counts['dead_letter']} dead-lettered, {counts['retry']} retried",
        "incidents: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
        if incidents
        else "incidents: none",
    ]
    return "\n".join([*lines, *_table(incidents)])


def _table(incidents: list[Incident]) -> list[str]:
    rows = [f"{'ID':36}  {'STATUS':12}  {'SEVERITY':8}  {'SERVICE':16}  {'N':>3}  TITLE"]
    for i in incidents:
        rows.append(
            f"{i.id!s:36}  {i.status:12}  {i.severity:8}  {i.service[:16]:16}  {i.occurrences:>3}  {i.title}"
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
        broker: Broker = await container.broker()
        store = await container.store() if with_store else None
        server = await _front_door(settings, container, broker, auth, store)
        metrics = container.metrics()
        ops = OpsServer(
            metrics.registry, host=settings.ops_host, port=settings.ops_port,
            checks={"broker": broker_check(broker, settings)} | ({"store": store.ping} if store else {}),
            loop_lag_threshold=settings.ops_loop_lag_threshold, on_lag=metrics.loop_lag.set,
        )  # fmt: skip
        if settings.ops_enabled:
            await ops.start()
        await _stop_on_signals().wait()
        ops.mark_stopping()  # /readyz 503 from now on
        await server.stop()  # stop accepting; answer the requests in flight (each waits for its confirm)
        await ops.stop()


async def _run(settings: Settings, auth: AuthPlan) -> None:
    async with _container(settings) as container:
        broker: Broker = await container.broker()
        dispatcher: Dispatcher = await container.dispatcher()  # type: ignore[misc]
        await broker.setup()
        ops = await _start_ops(settings, container, broker, dispatcher)
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
        broker: Broker = await container.broker()
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
@click.option("--json", "as_json", is_flag=True, help="One JSON array, incidents with their timelines.")
@click.pass_context
def incidents_list(ctx: click.Context, status: str | None, service: str | None, as_json: bool) -> None:
    """List incidents by correlation group (the group of the newest incident first), newest first."""
    found = asyncio.run(_incidents(_settings(ctx), status, service))
    if as_json:
        click.echo(json.dumps([i.model_dump(mode="json") for i in found], indent=2))
        return
    groups: dict[str, list[Incident]] = {}
    for incident in found:
        groups.setdefault(incident.correlation_group or str(incident.id), []).append(incident)
    for group, members in groups.items():
        first = members[0]
        scope = "/".join(x for x in (first.service, first.environment) if x) or "-"
        click.echo(f"group {group[:8]}  {scope}  {len(members)} incident(s)")
        click.echo("\n".join("  " + row for row in _table(members)))


async def _incidents(settings: Settings, status: str | None, service: str | None) -> list[Incident]:
    async with _container(settings) as container:
        store = await container.store()
        return await store.list(status=status, service=service)  # type: ignore[no-any-return]


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
            click.echo(f"{name:18} {value}")
    click.echo("timeline:")
    for entry in sorted(incident.timeline, key=lambda e: e.at):
        note = f"  {entry.note}" if entry.note else ""
        click.echo(f"  {entry.at.isoformat()}  {entry.kind:14} {entry.status:12} {entry.actor}{note}")


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
        click.echo(f"{x.message_id}  attempts={x.attempts}  {x.reason}")


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
    factory = CommandFactory(HANDLERS)
    report = asyncio.run(
        _dead_letters(
            _settings(ctx), lambda q: q.replay(validate=factory.decode, limit=limit, dry_run=dry_run)
        )
    )
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {len(report.replayed)}; left {len(report.invalid)} that would fail again")
    for message_id, why in report.invalid.items():
        click.echo(f"  {message_id}: {why}")


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
        broker: Broker = await container.broker()
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
    }


@cli.command()
@click.pass_context
def setup(ctx: click.Context) -> None:
    """Create the broker's topology and the store's schema (idempotent)."""
    asyncio.run(_setup(_settings(ctx)))


async def _setup(settings: Settings) -> None:
    async with _container(settings) as container:
        broker: Broker = await container.broker()
        await broker.setup()
        await container.store()
    click.echo(f"set up broker={settings.broker} store={settings.store}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
