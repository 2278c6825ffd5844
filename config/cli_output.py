"""What the command line says to people: how a failure ends (one line and an exit status, the settings'
problems one per line) and what a command prints (tables, summaries, an incident's detail, a dead letter
as JSON).

Kept apart from config/bootstrap.py because the two change for different reasons (a column or an exit
status vs a start-up step) and have different users: the bootstrap is shared with the tests, the
benchmarks and the HTTP servers, which print none of this. And kept light (click and ``common.text`` at
module level, the rest on use), because app.py imports it for ``--help``. Everything untrusted goes
through ``printable`` before it reaches a terminal.
"""

from __future__ import annotations

import base64
import collections
import json
import sys
from typing import TYPE_CHECKING, Any

import click

from common.text import printable

if TYPE_CHECKING:
    from application.incidents import Incident
    from application.ports import DeadLetter, ReplayReport
    from config.bootstrap import FeedReport
    from config.settings import Settings
    from infra.web.server import AuthPlan

_DETAIL = ("id", "title", "status", "severity", "service", "environment", "source", "dedup_key",
           "correlation_group", "assignee", "runbook_url", "occurrences", "created_at",
           "acknowledged_at", "resolved_at", "predecessor")  # fmt: skip


def version() -> str:
    """The installed version, for ``--version`` and the worker's start-up line."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("incidentd")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


# --- how a command fails: one line and an exit status ------------------------------------------------


class Refused(Exception):
    """A one-shot operation the broker or the store refused (not confirmed, bucket missing...), raised
    by config/bootstrap.py: the message is the whole story, so it is shown as click's one-line error."""


class OneLineErrors(click.Group):
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
            if isinstance(exc, Refused):  # the broker or the store said no: its message is the story
                raise click.ClickException(str(exc)) from None
            fail(exc, debug=bool(ctx.params.get("debug")), command=ctx.invoked_subcommand or "")
            ctx.exit(1)


def fail(exc: Exception, *, debug: bool, command: str) -> None:
    import structlog

    from common.redact import describe
    from common.startup import StartupError

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


def show_version(ctx: click.Context, _: click.Parameter, wanted: bool) -> None:
    if wanted and not ctx.resilient_parsing:
        click.echo(f"incidentd {version()}")
        ctx.exit()


def settings_with_origins(ctx: click.Context) -> tuple[Settings, dict[str, str]]:
    """The settings, or every problem with them on stderr (one line each) and exit 2."""
    from config.settings import SettingsError, load_with_origins

    try:
        return load_with_origins(ctx.obj)
    except SettingsError as exc:
        for line in exc.problems:
            click.echo(f"incidentd: {line}", err=True)
        sys.exit(2)


def settings(ctx: click.Context) -> Settings:
    return settings_with_origins(ctx)[0]


def needs_real_broker(settings: Settings, where: str, instead: str) -> None:
    """The commands that talk to a worker through the broker cannot reach another process's memory."""
    if settings.broker == "memory":
        raise click.UsageError(
            f"the memory broker lives inside one {where}; use {instead}, "
            "or set INCIDENTD_BROKER=rabbitmq or pubsub"
        )


def http_auth(settings: Settings) -> AuthPlan:
    """Who may call the HTTP server; refusing to start (e.g. no tokens off loopback) is exit 2."""
    from infra.web.server import RefusedToStart, plan_auth

    try:
        return plan_auth(settings, settings.http_host)
    except RefusedToStart as exc:
        click.echo(f"incidentd: {exc}", err=True)
        sys.exit(2)


# --- what a command prints ---------------------------------------------------------------------------


def feed_summary(report: FeedReport) -> str:
    """``worker --from``: what happened to the messages, then the incidents (newest first)."""
    counts, incidents = report.counts, report.incidents
    by_status = collections.Counter(i.status for i in incidents)
    lines = [
        f"messages: {counts['acked']:,} acked, {counts['dead_lettered']:,} dead-lettered, "
        f"{counts['retried']:,} retried",
        "incidents: " + ", ".join(f"{n:,} {s}" for s, n in sorted(by_status.items()))
        if incidents
        else "incidents: none",
    ]
    if report.total > len(incidents):
        lines.append(_newest(incidents, report.total))
    return "\n".join([*lines, *_table(incidents)])


def feed_result(report: FeedReport, *, strict: bool) -> tuple[str, int]:
    """The summary, with why it stopped early if it did, and the exit status: 1 when reading or
    publishing failed, 130 when interrupted, 1 with ``--strict`` when anything was dead-lettered."""
    summary = feed_summary(report)
    left = f"{report.finished:,} processed, {report.in_flight:,} not processed"
    if report.failed is not None:
        return f"{summary}\nstopped: {report.failed}; {left}", 1
    if report.interrupted:
        return f"{summary}\ninterrupted: {left}", 130
    return summary, 1 if strict and report.dead_lettered else 0


def replay_lines(report: ReplayReport, *, dry_run: bool) -> list[str]:
    """``dlq replay``: how many went back, then each one left behind with why it would fail again."""
    verb = "would replay" if dry_run else "replayed"
    lines = [f"{verb} {len(report.replayed)}; left {len(report.invalid)} that would fail again"]
    return lines + [
        f"  {printable(message_id)}: {printable(why)}" for message_id, why in report.invalid.items()
    ]


def setting_line(name: str, value: Any, source: str) -> str:
    """``config show``: name, value (JSON unless text) and where it came from."""
    return f"{name:36} {value if isinstance(value, str) else json.dumps(value)}  ({source})"


def incident_groups(incidents: list[Incident], total: int) -> list[str]:
    """``incidents list``: one block per correlation group, in the order of each group's newest."""
    groups: dict[str, list[Incident]] = {}
    for incident in incidents:
        groups.setdefault(incident.correlation_group or str(incident.id), []).append(incident)
    lines = []
    for group, members in groups.items():
        first = members[0]
        scope = "/".join(x for x in (first.service, first.environment) if x) or "-"
        lines.append(f"group {printable(group[:8])}  {printable(scope)}  {len(members)} incident(s)")
        lines.extend("  " + row for row in _table(members))
    if total > len(incidents):
        lines.append(_newest(incidents, total))
    return lines


def shown_of(incidents: list[Incident], total: int) -> str | None:
    """``incidents list --json``: the note (for stderr) when ``--limit`` cut the list."""
    return f"incidentd: {_newest(incidents, total)}" if total > len(incidents) else None


def incident_detail(incident: Incident) -> list[str]:
    """``incidents show``: the fields that are set, the timeline in time order, the latest analysis."""
    lines = [f"{name:18} {printable(value)}" for name in _DETAIL
             if (value := getattr(incident, name)) not in (None, "")]  # fmt: skip
    lines.append("timeline:")
    for entry in sorted(incident.timeline, key=lambda e: e.at):
        note = f"  {printable(entry.note)}" if entry.note else ""
        kind, actor = printable(entry.kind), printable(entry.actor)
        lines.append(f"  {entry.at.isoformat()}  {kind:14} {entry.status:12} {actor}{note}")
    return lines + _analysis(incident)


def letter_line(letter: DeadLetter) -> str:
    """``dlq list``: message id, attempts, copies when more than one, the reason."""
    copies = f"  copies={letter.copies}" if letter.copies > 1 else ""
    return f"{printable(letter.message_id)}  attempts={letter.attempts}{copies}  {printable(letter.reason)}"


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """``dlq list|show --json``: the body as text when it is UTF-8, else base64 (``body_encoding``)."""
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


def _newest(incidents: list[Incident], total: int) -> str:
    return f"showing the newest {len(incidents):,} of {total:,} incidents (--limit)"


def _table(incidents: list[Incident]) -> list[str]:
    rows = [f"{'ID':36}  {'STATUS':12}  {'SEVERITY':8}  {'SERVICE':16}  {'N':>3}  TITLE"]
    for i in incidents:
        rows.append(
            f"{i.id!s:36}  {i.status:12}  {i.severity:8}  {printable(i.service)[:16]:16}  "
            f"{i.occurrences:>3}  {printable(i.title)}"
        )
    return rows


def _analysis(incident: Incident) -> list[str]:
    """The latest AI analysis: summary, causes with evidence, cited next steps (docs/ai.md)."""
    from application.analysis import analyses

    done = [r for r in analyses(incident) if r.answer is not None]
    if not done:
        return []
    record = done[-1]
    answer = record.answer
    assert answer is not None
    lines = [
        f"analysis ({record.at.isoformat()}, {printable(record.model)}, {record.outcome};"
        " a suggestion, not an action):",
        f"  {printable(answer.summary)}",
    ]
    for cause in answer.probable_causes:
        lines.append(f"  cause ({cause.confidence:.0%}): {printable(cause.cause)}")
        lines.extend(f"    evidence: {printable(evidence)}" for evidence in cause.evidence)
    for step in answer.next_steps:
        cites = f"  [{printable(', '.join(step.cites))}]" if step.cites else ""
        lines.append(f"  next: {printable(step.step)}{cites}")
    if answer.related_incidents:
        lines.append(f"  related: {printable(', '.join(answer.related_incidents))}")
    return lines
