"""What the built-in handlers do besides changing the store, and in which order relative to its commit.

A message runs in this order: its command's handler list (``HANDLERS``), then the dispatcher's
after-commit steps (:func:`after_commit`, then the AI analysis requests when enabled). The dispatcher
runs all of it again on a retry.

1. **The store handler**: the incident change, in one transaction keyed by the message (effectively once).
   Nothing here changes it, and nothing here runs inside it. The transaction also records which
   incidents the message changes (``Transaction.changes``): what step 3 runs from.
2. **enrich** (Alertmanager, with Kubernetes enabled): reads the Deployments the firing alerts name,
   outside any transaction. Then it records what it found (state, or "Deployment shop/web does not
   exist", or the read error) on the open incidents in one short transaction of its own, keyed
   ``<key>:kubernetes``. A failed read is recorded on the incident and never retried: an incident must
   not wait for, or dead-letter because of, a cluster API.
3. **after_commit** (the dispatcher's, for every command): outside any transaction, from that record:

   a. re-reads the incidents the message changed (a short read-only transaction);
   b. runs the actions the rules call for;
   c. opens the GitHub issue;
   d. records the action results and the issue link (a short transaction);
   e. sends one Slack message per transition;
   f. comments on the GitHub issue, and closes it on resolve.

Why it survives redelivery: step 3 derives everything from the **committed** timeline, from the entries
whose ``message_id`` is this message's. So a redelivery, or a retry after a crash or a failed side
effect, finds the same work even though the store handler then changes nothing. What is recorded
(action results, the issue link) is skipped on the next attempt. The rest is at-least-once:

* An action runs again only if it succeeded and its result was not recorded (a crash, or the store
  failing, between b and d): at least once.
* An issue is opened only by the message that opened the incident, and only while the incident has no
  link. If an earlier attempt of this message's follow-up got as far as a (its read transaction is then
  already processed), the tracker first looks for an issue that attempt opened, by the marker in its
  body. So a second issue needs two deliveries of one message running at the same time.
* Slack messages and issue comments are sent after the commit and are not recorded: at least once. A
  retry re-sends those that already went out before the failure.

Failures of side effects:

* TransientError from an action, the issue open, a comment or Slack **retries the whole message**. The
  store handler is then a no-op, and only the work still owed is done again.
* PermanentError from an action is recorded on the timeline as ``<rule>: failed: <why>``. From GitHub or
  Slack (bad token, unknown repository, deleted webhook) it is logged as ``side_effect.failed`` and the
  message is acked. Retrying cannot help, and the incident itself is safe in the store. A dead letter
  would only hide it behind a chat misconfiguration.
* An unexpected exception is retried, like everywhere else (the dispatcher decides).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import structlog

from application.commands import Command
from application.dispatcher import Context
from application.errors import IncidentdError, PermanentError
from application.incidents import Incident, TimelineEntry
from application.ports import (
    ISSUE_LINK,
    ISSUE_URL_LINK,
    ActionRunner,
    ActionTrigger,
    ChangedIncident,
    Cluster,
    DeploymentStatus,
    IncidentStore,
    IssueTracker,
    Missing,
    Notifier,
    PlannedAction,
    TrackedIssue,
)
from common.redact import redact

log = structlog.get_logger("incidentd.side_effects")

ACTOR = "incidentd"  # the actor of action results on the timeline
# Timeline kinds people are told about (Slack, issue comments). A repeated firing only counts, unless it
# reopened the incident. Facts (enriched) are shown inside the messages, not sent on their own.
NOTIFY_KINDS = frozenset(
    {"opened", "acknowledged", "unacknowledged", "resolved", "assigned", "note", "action"}
)


# --- 2. Kubernetes enrichment ----------------------------------------------------------------------


async def enrich(
    targets: Mapping[str, tuple[str, str]], ctx: Context, store: IncidentStore, cluster: Cluster
) -> None:
    """``targets``: dedup key -> (namespace, deployment). Each Deployment is read once, all at once."""
    workloads = sorted(set(targets.values()))
    found = await asyncio.gather(*(deployment_facts(cluster, ns, name) for ns, name in workloads))
    facts = dict(zip(workloads, found, strict=True))
    async with store.transaction(f"{ctx.idempotency_key}:kubernetes") as tx:
        if tx.already_processed:
            return
        for key, incident in (await tx.latest(list(targets))).items():
            if incident.is_open and _entries_by(incident, ctx.message_id):
                incident.enrich("kubernetes", facts[targets[key]], at=_now(), message_id=ctx.message_id)
                await tx.update(incident)


async def deployment_facts(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """What the incident keeps about a Deployment; ``summary`` is the line people read."""
    base: dict[str, Any] = {"namespace": namespace, "deployment": name, "checked_at": _now().isoformat()}
    try:
        status = await cluster.deployment_status(namespace, name)
    except IncidentdError as exc:  # classified by the adapter; recorded, not retried (see the docstring)
        error = redact(str(exc))  # stored on the incident: no URL password or token in it
        summary = f"could not read Deployment {namespace}/{name}: {error}"
        return {**base, "found": None, "error": error, "summary": summary}
    if isinstance(status, Missing):
        return {**base, "found": False, "missing": str(status), "summary": str(status)}
    return {**base, "found": True, **_status_facts(status), "summary": _status_summary(status)}


def _status_facts(status: DeploymentStatus) -> dict[str, Any]:
    return {
        "desired_replicas": status.desired_replicas, "ready_replicas": status.ready_replicas,
        "updated_replicas": status.updated_replicas, "available_replicas": status.available_replicas,
        "images": list(status.images), "rollout": status.rollout, "paused": status.paused,
        "last_restart": status.last_restart.isoformat() if status.last_restart else None,
    }  # fmt: skip


def _status_summary(status: DeploymentStatus) -> str:
    parts = [
        f"{status.ready_replicas}/{status.desired_replicas} ready",
        f"rollout {status.rollout}" + (" (paused)" if status.paused else ""),
        "images " + ", ".join(status.images) if status.images else "no images",
        f"last restart {status.last_restart.isoformat()}" if status.last_restart else "never restarted",
    ]
    return f"Deployment {status.namespace}/{status.name}: " + ", ".join(parts)


# --- 3. after the commit: actions, GitHub, Slack --------------------------------------------------------


async def after_commit(
    cmd: Command,
    ctx: Context,
    store: IncidentStore,
    actions: ActionRunner,
    issue_tracker: IssueTracker | None,
    notifier: Notifier | None,
) -> None:
    """The dispatcher's after-commit step: the follow-ups of the incidents this message's transaction
    recorded (none when it recorded none: no extra transaction)."""
    if ctx.changes:
        await follow_up(ctx.changes, ctx, store, actions=actions, tracker=issue_tracker, notifier=notifier)


async def follow_up(
    changes: Sequence[ChangedIncident],
    ctx: Context,
    store: IncidentStore,
    *,
    actions: ActionRunner,
    tracker: IssueTracker | None,
    notifier: Notifier | None,
) -> None:
    """Steps a-f of the module docstring for the incidents ``changes`` names."""
    configured = tracker is not None or notifier is not None or any(_plans(actions, c) for c in changes)
    if not configured:
        return  # nothing to do for this message: no extra transaction
    found, retried = await _reread(store, ctx, changes)
    if not found:
        return
    mid = ctx.message_id
    owed = _owed_actions(found, actions, mid)
    results: dict[UUID, list[str]] = {}
    issues: dict[UUID, TrackedIssue] = {}
    try:
        await _run_actions(owed, actions, results)
        if tracker is not None:
            await _open_issues(found, tracker, mid, retried, issues)
    finally:  # also on the way out of a TransientError: what was done is not done again
        if results or issues:
            recorded = await _record(store, ctx, found, results, issues)
            found = [(t, recorded.get(incident.id, incident)) for t, incident in found]
    for _, incident in found:
        transitions = _transitions(incident, mid)
        if notifier is not None:
            for entry in transitions:
                await _tell("slack.notify", incident, notifier.notify(incident, entry))
        if tracker is not None and ISSUE_LINK in incident.links:
            await _update_issue(tracker, incident, transitions, just_opened=incident.id in issues)


async def _reread(
    store: IncidentStore, ctx: Context, changes: Sequence[ChangedIncident]
) -> tuple[list[tuple[ChangedIncident, Incident]], bool]:
    """The committed incidents this message changed (those with entries by it), read in a transaction
    that changes nothing. Its key being processed already means that an earlier attempt got this far:
    its external calls may have happened."""
    async with store.transaction(f"{ctx.idempotency_key}:follow-up") as tx:
        keys = [c.dedup_key for c in changes if c.dedup_key]
        latest = await tx.latest(keys) if keys else {}
        found: dict[UUID, tuple[ChangedIncident, Incident]] = {}
        for change in changes:
            incident = latest.get(change.dedup_key) if change.dedup_key else None
            if incident is None and change.incident_id is not None:
                incident = await tx.get(change.incident_id)
            if incident is not None and incident.id not in found and _entries_by(incident, ctx.message_id):
                found[incident.id] = (change, incident)
        return list(found.values()), tx.already_processed


def _plans(actions: ActionRunner, change: ChangedIncident) -> list[PlannedAction]:
    return actions.plan(ActionTrigger(change.trigger, change.labels)) if change.trigger else []


def _owed_actions(
    found: Sequence[tuple[ChangedIncident, Incident]], actions: ActionRunner, mid: str
) -> dict[tuple[str, str], tuple[PlannedAction, list[Incident]]]:
    """(rule, target) -> the action and the incidents whose trigger asked for it and have no result yet.
    An alert's trigger counts only on the incident this message opened (not on a repeat)."""
    owed: dict[tuple[str, str], tuple[PlannedAction, list[Incident]]] = {}
    for change, incident in found:
        if change.trigger == "opened" and not _opened_by(incident, mid):
            continue
        for planned in _plans(actions, change):
            if not _has_result(incident, planned.rule, mid):
                owed.setdefault((planned.rule, planned.target), (planned, []))[1].append(incident)
    return owed


async def _run_actions(
    owed: Mapping[tuple[str, str], tuple[PlannedAction, list[Incident]]],
    actions: ActionRunner,
    results: dict[UUID, list[str]],
) -> None:
    """Each (rule, target) once; its result goes on every incident that asked for it."""
    for planned, incidents in owed.values():
        try:
            result = await actions.run(planned, incidents[0])
        except PermanentError as exc:
            result = f"failed: {redact(str(exc))}"
        log.info("action.done", rule=planned.rule, target=planned.target, result=result)
        for incident in incidents:
            results.setdefault(incident.id, []).append(f"{planned.rule}: {result}")


async def _open_issues(
    found: Sequence[tuple[ChangedIncident, Incident]],
    tracker: IssueTracker,
    mid: str,
    retried: bool,
    issues: dict[UUID, TrackedIssue],
) -> None:
    """Issues for the tracked incidents this message opened (only the opener opens: two messages about
    one incident never race to open two)."""
    for _, incident in found:
        if ISSUE_LINK in incident.links or not tracker.tracks(incident) or not _opened_by(incident, mid):
            continue
        try:  # the look for an earlier attempt's issue too: a revoked token must not dead-letter
            issue = await tracker.find_issue(incident) if retried else None
            if issue is None:
                issue = await tracker.open_issue(incident)
        except PermanentError as exc:
            log.error("side_effect.failed", effect="github.open_issue", incident_id=str(incident.id),
                      error=str(exc))  # fmt: skip
            continue
        issues[incident.id] = issue


async def _record(
    store: IncidentStore,
    ctx: Context,
    found: Sequence[tuple[ChangedIncident, Incident]],
    results: Mapping[UUID, list[str]],
    issues: Mapping[UUID, TrackedIssue],
) -> dict[UUID, Incident]:
    """Action results and issue links onto the incidents, each at most once (checked under the lock, so
    a concurrent attempt cannot double them); the key only needs to be new."""
    changed = [incident for _, incident in found if incident.id in results or incident.id in issues]
    recorded: dict[UUID, Incident] = {}
    async with store.transaction(f"{ctx.idempotency_key}:recorded:{uuid4().hex}") as tx:
        latest = await tx.latest(sorted({incident.dedup_key for incident in changed}))
        for before in changed:
            current = latest.get(before.dedup_key)
            if current is None or current.id != before.id:  # a successor opened meanwhile
                current = await tx.get(before.id)
            if current is None:
                continue
            for note in results.get(current.id, []):
                if not _has_result(current, note.split(":", 1)[0], ctx.message_id):
                    current.record_fact(kind="action", actor=ACTOR, note=note, at=_now(),
                                        message_id=ctx.message_id)  # fmt: skip
            if current.id in issues:
                _link(current, issues[current.id])
            await tx.update(current)
            recorded[current.id] = current
    return recorded


def _link(incident: Incident, issue: TrackedIssue) -> None:
    stored = incident.links.get(ISSUE_LINK)
    if stored is not None and stored != str(issue.number):
        log.warning("github.duplicate_issue", incident_id=str(incident.id), kept=stored, extra=issue.number)
        return
    incident.links[ISSUE_LINK], incident.links[ISSUE_URL_LINK] = str(issue.number), issue.url


async def _update_issue(
    tracker: IssueTracker, incident: Incident, transitions: Sequence[TimelineEntry], *, just_opened: bool
) -> None:
    """A comment per transition (the issue's body already tells the opening); resolving closes it. An
    issue opened just now for an incident already resolved (by another message) is closed at once."""
    resolved_here = False
    for entry in transitions:
        if entry.kind == "opened":
            continue
        if entry.kind == "resolved" and incident.status == "resolved":
            resolved_here = True
            await _tell("github.close_issue", incident, tracker.close_issue(incident, entry))
        else:
            await _tell("github.comment", incident, tracker.comment(incident, entry))
    if just_opened and incident.status == "resolved" and not resolved_here:
        resolution = next(e for e in reversed(incident.timeline) if e.kind == "resolved")
        await _tell("github.close_issue", incident, tracker.close_issue(incident, resolution))


async def _tell(effect: str, incident: Incident, call: Awaitable[None]) -> None:
    """A notification; TransientError propagates (the message is retried), PermanentError is logged."""
    try:
        await call
    except PermanentError as exc:
        log.error("side_effect.failed", effect=effect, incident_id=str(incident.id), error=str(exc))


# --- the timeline, read for this message ---------------------------------------------------------------


def _entries_by(incident: Incident, mid: str) -> list[TimelineEntry]:
    return [entry for entry in incident.timeline if entry.message_id == mid]


def _opened_by(incident: Incident, mid: str) -> bool:
    return any(e.kind == "opened" for e in _entries_by(incident, mid))


def _has_result(incident: Incident, rule: str, mid: str) -> bool:
    return any(
        e.kind == "action" and e.actor == ACTOR and e.note.startswith(f"{rule}:")
        for e in _entries_by(incident, mid)
    )


def _transitions(incident: Incident, mid: str) -> list[TimelineEntry]:
    """This message's entries people are told about, in timeline order."""
    told: list[TimelineEntry] = []
    previous = None
    for entry in incident.timeline:
        reopened = entry.kind == "occurrence" and previous is not None and entry.status != previous
        if entry.message_id == mid and (entry.kind in NOTIFY_KINDS or reopened):
            told.append(entry)
        previous = entry.status
    return told


def _now() -> datetime:
    return datetime.now(UTC)
