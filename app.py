"""incidentd's command line: ``python app.py --help``.

Only the commands and their options live here. What a command starts is in config/bootstrap.py, what it
prints in config/cli_output.py; both are imported inside the commands, so ``--help`` and a mistyped option
answer without loading the application (docs/architecture.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from config import cli_output

T = TypeVar("T")


@click.group(cls=cli_output.OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file of settings (environment variables INCIDENTD_* take precedence).",
)
@click.option("--debug", is_flag=True, help="On failure, show the traceback (without it: one line).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=cli_output.show_version,
              help="Show the version and exit.")  # fmt: skip
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None, debug: bool) -> None:
    """incidentd: turns operational events into incidents and actions."""
    ctx.obj = config_file


def _run(work: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, imported on use like everything a command needs."""
    import asyncio

    return asyncio.run(work)


# --- worker and servers ----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--from",
    "from_file",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path),
    help="Feed this JSON-lines file (- for stdin) into the embedded broker, process it, print a summary, "
    "exit. Uses the embedded broker whatever INCIDENTD_BROKER says.",
)
@click.option("--strict", is_flag=True, help="With --from: exit 1 if any message was dead-lettered.")
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True,
              help="With --from: incidents listed in the summary.")  # fmt: skip
@click.pass_context
def worker(ctx: click.Context, from_file: Path | None, strict: bool, limit: int) -> None:
    """Consume messages until SIGTERM / SIGINT, then drain and exit 0."""
    from config import bootstrap

    if from_file is None:
        _run(bootstrap.worker(cli_output.settings(ctx)))
        return
    report = _run(bootstrap.feed(cli_output.settings(ctx), from_file, limit=limit))
    text, status = cli_output.feed_result(report, strict=strict)
    click.echo(text)
    sys.exit(status)


@cli.command()
@click.pass_context
def ingest(ctx: click.Context) -> None:
    """Serve the HTTP ingest until SIGTERM: webhooks in, validated, published; 202 only once confirmed."""
    from config import bootstrap

    settings = cli_output.settings(ctx)
    cli_output.needs_real_broker(settings, "process", "'run' (ingest and worker in one process)")
    _run(bootstrap.ingest(settings, cli_output.http_auth(settings)))


@cli.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Serve the HTTP ingest, the incident API and the dashboard until SIGTERM (reads the store; every
    change is published for the workers). The ingest's rules apply: tokens file, real broker."""
    from config import bootstrap

    settings = cli_output.settings(ctx)
    cli_output.needs_real_broker(settings, "process", "'run' (everything in one process)")
    _run(bootstrap.ingest(settings, cli_output.http_auth(settings), with_store=True))


@cli.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Everything in one process (the embedded default: memory broker, SQLite): the HTTP ingest and the
    worker. Binds 127.0.0.1 unless INCIDENTD_HTTP_HOST (INCIDENTD_OPS_HOST for the probes and metrics) is
    set; SIGTERM / Ctrl-C stops both."""
    from config import bootstrap

    settings = bootstrap.embedded(cli_output.settings(ctx))
    _run(bootstrap.run_all(settings, cli_output.http_auth(settings)))


# --- publish ----------------------------------------------------------------------------------------


@cli.command()
@click.argument("type_name", metavar="TYPE")
@click.argument("source", type=click.File("rb"), default="-")
@click.option("--attribute", "-a", multiple=True, help="Extra attribute KEY=VALUE (repeatable).")
@click.pass_context
def publish(ctx: click.Context, type_name: str, source: Any, attribute: tuple[str, ...]) -> None:
    """Publish one JSON document from SOURCE (a file, or - for stdin) as a message of TYPE."""
    from config import bootstrap

    settings = cli_output.settings(ctx)
    cli_output.needs_real_broker(settings, "worker process", "'worker --from FILE'")
    body = source.read()
    try:
        json.loads(body)
    except ValueError as exc:
        raise click.BadParameter(f"not a JSON document: {exc}", param_hint="SOURCE") from None
    attributes = dict(a.split("=", 1) for a in attribute if "=" in a)
    click.echo(_run(bootstrap.publish(settings, body, type_name, attributes)))


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
    from config import bootstrap

    found, total = _run(bootstrap.incidents(cli_output.settings(ctx), status, service, limit))
    if not as_json:
        for line in cli_output.incident_groups(found, total):
            click.echo(line)
        return
    click.echo(json.dumps([i.model_dump(mode="json") for i in found], indent=2))
    if note := cli_output.shown_of(found, total):
        click.echo(note, err=True)


@incidents.command("show")
@click.argument("incident_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="The incident as JSON.")
@click.pass_context
def incidents_show(ctx: click.Context, incident_id: Any, as_json: bool) -> None:
    """Show one incident with its timeline (every transition: time, kind, actor, note, message)."""
    from config import bootstrap

    incident = _run(bootstrap.incident(cli_output.settings(ctx), incident_id))
    if incident is None:
        raise click.ClickException(f"no incident {incident_id}")
    if as_json:
        click.echo(incident.model_dump_json(indent=2))
        return
    click.echo("\n".join(cli_output.incident_detail(incident)))


def _publishing(verb: str, type_name: str) -> None:
    """``incidents ack|resolve|analyze ID [--note]``: publish ``type_name`` for the worker; print its
    message id. (``analyze``: AI analysis, docs/ai.md; ``--note`` is a question for the model.)"""

    @incidents.command(verb, help=f"Publish an {type_name} command for INCIDENT_ID; print its message id.")
    @click.argument("incident_id", type=click.UUID)
    @click.option("--note", default="", help="Kept on the incident's timeline.")
    @click.pass_context
    def command(ctx: click.Context, incident_id: Any, note: str) -> None:
        from config import bootstrap

        settings = cli_output.settings(ctx)
        cli_output.needs_real_broker(settings, "worker process", "'worker --from FILE'")
        click.echo(_run(bootstrap.incident_command(settings, type_name, incident_id, note)))


_publishing("ack", "incident.acknowledge")
_publishing("resolve", "incident.resolve")
_publishing("analyze", "incident.analyze")


@cli.group()
def dlq() -> None:
    """Inspect the dead-letter destination."""


@dlq.command("list")
@click.option("--limit", type=int, help="At most this many entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array: body, attributes, reason, attempts.")
@click.pass_context
def dlq_list(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """List dead-lettered messages, oldest first, with the reason each was dead-lettered."""
    from config import bootstrap

    letters = _run(bootstrap.list_dead_letters(cli_output.settings(ctx), limit))
    if as_json:
        click.echo(json.dumps([cli_output.letter_json(x) for x in letters], indent=2))
        return
    for letter in letters:
        click.echo(cli_output.letter_line(letter))


@dlq.command("show")
@click.argument("message_id")
@click.pass_context
def dlq_show(ctx: click.Context, message_id: str) -> None:
    """Show one dead letter (body, attributes, reason) as JSON."""
    from config import bootstrap

    letters = _run(bootstrap.list_dead_letters(cli_output.settings(ctx)))
    found = [cli_output.letter_json(x) for x in letters if x.message_id == message_id]
    if not found:
        raise click.ClickException(f"no dead letter with message id {message_id}")
    click.echo(json.dumps(found[0], indent=2))


@dlq.command("replay")
@click.option("--limit", type=int, help="At most this many messages, oldest first.")
@click.option("--dry-run", is_flag=True, help="Report what would be replayed; change nothing.")
@click.pass_context
def dlq_replay(ctx: click.Context, limit: int | None, dry_run: bool) -> None:
    """Re-validate dead letters and publish the valid ones back to the main destination (attempt 1)."""
    from config import bootstrap

    report = _run(bootstrap.replay(cli_output.settings(ctx), limit=limit, dry_run=dry_run))
    click.echo("\n".join(cli_output.replay_lines(report, dry_run=dry_run)))


@dlq.command("purge")
@click.option("--limit", type=int, help="At most this many messages, oldest first.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(ctx: click.Context, limit: int | None, dry_run: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    from config import bootstrap

    if not (dry_run or yes):
        click.confirm("Delete dead letters for good?", abort=True)
    purge = bootstrap.dead_letters(cli_output.settings(ctx), lambda q: q.purge(limit=limit, dry_run=dry_run))
    click.echo(f"{'would delete' if dry_run else 'deleted'} {_run(purge)}")


# --- maintenance and set-up -------------------------------------------------------------------------


@cli.command()
@click.pass_context
def maintenance(ctx: click.Context) -> None:
    """Prune old idempotency keys and (if enabled) archive old resolved incidents to S3, once.

    Safe to run at any time and to repeat; while another process runs it, this one does nothing.
    """
    from config import bootstrap

    click.echo(_run(bootstrap.maintain(cli_output.settings(ctx))))


@cli.command()
@click.pass_context
def setup(ctx: click.Context) -> None:
    """Create the broker's topology and the store's schema (idempotent)."""
    from config import bootstrap

    settings = cli_output.settings(ctx)
    _run(bootstrap.set_up(settings))
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
    from config.settings import shown

    settings, origins = cli_output.settings_with_origins(ctx)
    values = {name: {"value": value, "source": origins[name]} for name, value in shown(settings).items()}
    if as_json:
        click.echo(json.dumps(values, indent=2))
        return
    for name, shown_as in values.items():
        click.echo(cli_output.setting_line(name, shown_as["value"], shown_as["source"]))


@config.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the settings (and read the secret files they name) without starting anything: exit 0
    and "ok", or exit 2 with one line per problem."""
    from config import bootstrap

    settings = cli_output.settings(ctx)
    problems = bootstrap.secret_problems(settings)
    for line in problems:
        click.echo(f"incidentd: {line}", err=True)
    if problems:
        sys.exit(2)
    click.echo(f"ok: broker={settings.broker} store={settings.store}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
