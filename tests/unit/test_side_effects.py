"""The built-in handlers' side effects (application/side_effects.py) with in-memory fakes of the adapters:
enrichment, action rules, the GitHub issue and Slack, and what a redelivery or a failure does to them.

Each message is handled like the dispatcher does: its whole handler list and the after-commit step with
one context, and again (same message id) for a redelivery or retry.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from application.actions import ActionRule, ActionRules
from application.commands import AcknowledgeIncident, AlertmanagerWebhook, Command, OpsgenieAction
from application.dispatcher import Context, Dispatcher, RetryPolicy, bind, bind_all
from application.errors import PermanentError, TransientError
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.handlers.events import message_transaction
from application.incidents import Incident, IncidentPolicy, TimelineEntry
from application.messages import Disposition, Message
from application.ports import (
    ISSUE_LINK,
    ActionResult,
    ChangedIncident,
    DeploymentStatus,
    Missing,
    TrackedIssue,
)
from application.side_effects import after_commit
from infra.sqlite.store import SqliteStore
from tests.conftest import fixture_json
from tests.unit.test_dispatcher import FakeDelivery, outcome_of

CHECKOUT = DeploymentStatus(
    namespace="shop", name="checkout", desired_replicas=3, ready_replicas=2, updated_replicas=3,
    available_replicas=2, images=("registry.example/checkout:7.1",), rollout="progressing",
    last_restart=datetime(2026, 11, 1, 8, 30, tzinfo=UTC),
)  # fmt: skip
RESTART_RULE = {"name": "restart-on-label", "labels": {"incidentd_action": "restart"}, "action": "restart"}
FIRST, SECOND = "alertmanager:c1f0a2b3d4e5f607", "alertmanager:d2e1b3c4f5a60718"


# --- fakes ---------------------------------------------------------------------------------------------


class FakeCluster:
    """Deployments by (namespace, name); ``read_error`` makes every read fail."""

    def __init__(self, *deployments: DeploymentStatus, read_error: Exception | None = None) -> None:
        self.deployments = {(d.namespace, d.name): d for d in deployments}
        self.read_error = read_error
        self.reads: list[tuple[str, str]] = []
        self.restarts: list[tuple[str, str]] = []

    async def namespace_exists(self, namespace: str) -> bool:
        return any(ns == namespace for ns, _ in self.deployments)

    async def deployment_status(self, namespace: str, name: str) -> DeploymentStatus | Missing:
        self.reads.append((namespace, name))
        if self.read_error is not None:
            raise self.read_error
        return self.deployments.get((namespace, name)) or Missing("Deployment", namespace, name)

    async def rollout_restart(self, namespace: str, name: str) -> ActionResult:
        if (namespace, name) not in self.deployments:
            raise PermanentError(f"cannot restart: {Missing('Deployment', namespace, name)}")
        self.restarts.append((namespace, name))
        return ActionResult("rollout restart", f"deployment {namespace}/{name}", "restartedAt=now")

    async def scale(self, namespace: str, name: str, replicas: int) -> ActionResult:
        raise NotImplementedError


class FakeTracker:
    """Critical incidents get an issue; remembers them by incident id (as the body marker would)."""

    def __init__(self) -> None:
        self.issues: dict[int, dict[str, Any]] = {}
        self.found: list[int] = []

    def tracks(self, incident: Incident) -> bool:
        return incident.severity == "critical"

    async def open_issue(self, incident: Incident) -> TrackedIssue:
        number = len(self.issues) + 1
        self.issues[number] = {"incident": incident.id, "comments": [], "state": "open"}
        return TrackedIssue(number, f"https://github.example/acme/ops/issues/{number}")

    async def find_issue(self, incident: Incident) -> TrackedIssue | None:
        for number, issue in self.issues.items():
            if issue["incident"] == incident.id:
                self.found.append(number)
                return TrackedIssue(number, f"https://github.example/acme/ops/issues/{number}")
        return None

    async def comment(self, incident: Incident, entry: TimelineEntry) -> None:
        self.issues[int(incident.links[ISSUE_LINK])]["comments"].append(entry.kind)

    async def close_issue(self, incident: Incident, entry: TimelineEntry) -> None:
        await self.comment(incident, entry)
        self.issues[int(incident.links[ISSUE_LINK])]["state"] = "closed"


class FakeNotifier:
    """Records (dedup key, kind, issue link) per message; ``failures`` are raised first, one per call."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.failures: list[Exception] = []

    async def notify(self, incident: Incident, entry: TimelineEntry) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((incident.dedup_key, entry.kind, incident.links.get(ISSUE_LINK, "")))


class FlakyStore:
    """A store whose next transaction with a key containing ``fail_on`` fails before it commits."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.fail_on = ""

    @asynccontextmanager
    async def transaction(self, idempotency_key: str, *announced: Any) -> AsyncIterator[Any]:
        async with self._store.transaction(idempotency_key, *announced) as tx:
            yield tx
            if self.fail_on and self.fail_on in idempotency_key:
                self.fail_on = ""
                raise TransientError("store connection lost before the commit")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


# --- harness -------------------------------------------------------------------------------------------


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(":memory:")
    yield store
    await store.close()


class World:
    """The handlers wired to a store and fakes, as the container wires them."""

    def __init__(self, store: Any, *, rules: list[dict[str, Any]] = (), dry_run: bool = False, **fakes: Any):
        self.store = store
        self.cluster: FakeCluster | None = fakes.get("cluster")
        self.tracker: FakeTracker | None = fakes.get("tracker")
        self.notifier: FakeNotifier | None = fakes.get("notifier")
        actions = ActionRules([ActionRule.model_validate(r) for r in rules], cluster=self.cluster,
                              policy=IncidentPolicy(), dry_run=dry_run)  # fmt: skip
        deps = {"store": store, "policy": IncidentPolicy(), "actions": actions, "cluster": self.cluster,
                "issue_tracker": self.tracker, "notifier": self.notifier}  # fmt: skip
        self.deps = deps
        self.handlers = bind(HANDLERS, deps)
        self.after_commit = bind_all([after_commit], deps)

    async def handle(self, command: Command, message_id: str) -> None:
        """The command's handlers, then the after-commit step, as the dispatcher runs them."""
        ctx = Context(message_id=message_id, idempotency_key=message_id, attempt=1)
        for handler in (*self.handlers[type(command)], *self.after_commit):
            await handler(command, ctx)

    async def incident(self, key: str) -> Incident:
        [found] = [i for i in await self.store.list() if i.dedup_key == key]
        return found


def firing(**labels: str) -> AlertmanagerWebhook:
    """The two-alert firing batch (both critical, both in Deployment shop/checkout) plus ``labels``."""
    data = copy.deepcopy(fixture_json("alertmanager_firing"))
    for alert in data["alerts"]:
        alert["labels"].update(labels)
    return AlertmanagerWebhook.model_validate(data)


def resolved() -> AlertmanagerWebhook:
    return AlertmanagerWebhook.model_validate(fixture_json("alertmanager_resolved"))


def results(incident: Incident) -> list[str]:
    return [e.note for e in incident.timeline if e.kind == "action" and e.actor == "incidentd"]


@pytest.fixture
def fakes() -> Iterator[dict[str, Any]]:
    yield {"cluster": FakeCluster(CHECKOUT), "tracker": FakeTracker(), "notifier": FakeNotifier()}


# --- tests ---------------------------------------------------------------------------------------------


async def test_a_firing_alert_for_a_deployment_is_enriched_acted_on_tracked_and_announced(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """Both incidents of the batch get the Deployment's state, one rollout restart answers both (one
    per (rule, target) per message) and is on both timelines, each gets a GitHub issue, and Slack hears
    of each opening and each action, with the issue linked."""
    world = World(store, rules=[RESTART_RULE], **fakes)
    await world.handle(firing(incidentd_action="restart"), "m-1")

    first, second = await world.incident(FIRST), await world.incident(SECOND)
    facts = first.enrichment["kubernetes"]
    assert (facts["found"], facts["ready_replicas"], facts["rollout"]) == (True, 2, "progressing")
    assert facts["images"] == ["registry.example/checkout:7.1"]
    assert facts["last_restart"] == "2026-11-01T08:30:00+00:00"
    assert [e.note for e in first.timeline if e.kind == "enriched"] == [facts["summary"]]
    assert facts["summary"].startswith("Deployment shop/checkout: 2/3 ready, rollout progressing")
    assert world.cluster.reads == [("shop", "checkout")] and world.cluster.restarts == [("shop", "checkout")]
    expected = "restart-on-label: rollout restart deployment shop/checkout: restartedAt=now"
    assert results(first) == results(second) == [expected]
    assert (first.links[ISSUE_LINK], second.links[ISSUE_LINK]) == ("1", "2")
    assert sorted(world.notifier.sent) == [(FIRST, "action", "1"), (FIRST, "opened", "1"),
                                           (SECOND, "action", "2"), (SECOND, "opened", "2")]  # fmt: skip
    assert world.tracker.issues[1]["comments"] == ["action"]  # the body tells the opening


async def test_a_redelivery_opens_no_second_issue_and_runs_no_second_action(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """The same message again (e.g. its ack was lost): the store changes nothing, the issue link and the
    action result are found on the incident, so nothing is opened or restarted twice; Slack hears it
    again (at-least-once)."""
    world = World(store, rules=[RESTART_RULE], **fakes)
    await world.handle(firing(incidentd_action="restart"), "m-1")
    await world.handle(firing(incidentd_action="restart"), "m-1")

    assert len(world.tracker.issues) == 2 and world.cluster.restarts == [("shop", "checkout")]
    first = await world.incident(FIRST)
    assert results(first) == ["restart-on-label: rollout restart deployment shop/checkout: restartedAt=now"]
    assert first.occurrences == 1 and len(world.notifier.sent) == 8


async def test_an_issue_opened_but_not_stored_is_found_again_not_opened_twice(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """GitHub opened the issue, then the store failed before the link was committed: the retry finds the
    issue by its marker (find_issue) and stores it, instead of opening a twin."""
    flaky = FlakyStore(store)
    world = World(flaky, **fakes)
    flaky.fail_on = ":recorded:"
    with pytest.raises(TransientError):
        await world.handle(firing(), "m-1")
    assert len(world.tracker.issues) == 2  # both opened, neither link stored
    await world.handle(firing(), "m-1")

    assert len(world.tracker.issues) == 2
    assert world.tracker.found == [1, 2]
    first, second = await world.incident(FIRST), await world.incident(SECOND)
    assert sorted([first.links[ISSUE_LINK], second.links[ISSUE_LINK]]) == ["1", "2"]


async def test_dry_run_acts_on_nothing_and_says_what_it_would_do(store: SqliteStore) -> None:
    """The embedded example's set-up: dry_run on, Kubernetes off. The rule's action is on the timeline
    as what would be done; no adapter exists to change anything."""
    world = World(store, rules=[RESTART_RULE], dry_run=True)
    await world.handle(firing(incidentd_action="restart"), "m-1")
    assert results(await world.incident(FIRST)) == [
        "restart-on-label: would restart deployment shop/checkout (dry run; kubernetes adapter disabled, "
        "nothing checked)"
    ]


async def test_a_missing_deployment_is_recorded_and_its_action_fails_once_without_retrying(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """An alert naming a Deployment the cluster lacks: the incident says so, the restart's permanent
    failure is its recorded result, and the message is acked (no error loop)."""
    world = World(store, rules=[RESTART_RULE], **{**fakes, "cluster": FakeCluster()})
    await world.handle(firing(incidentd_action="restart"), "m-1")
    first = await world.incident(FIRST)
    assert first.enrichment["kubernetes"]["found"] is False
    assert [e.note for e in first.timeline if e.kind == "enriched"] == [
        "Deployment shop/checkout does not exist"
    ]
    assert results(first) == [
        "restart-on-label: failed: cannot restart: Deployment shop/checkout does not exist"
    ]
    await world.handle(firing(incidentd_action="restart"), "m-1")
    assert results(await world.incident(FIRST)) == results(first)


async def test_an_unreachable_cluster_api_is_recorded_not_retried(store: SqliteStore) -> None:
    """Enrichment is worth less than the incident: a transient read failure is noted on the incident."""
    cluster = FakeCluster(read_error=TransientError("no answer from the Kubernetes API within 10s"))
    world = World(store, cluster=cluster)
    await world.handle(firing(), "m-1")
    facts = (await world.incident(FIRST)).enrichment["kubernetes"]
    assert facts["found"] is None and "no answer from the Kubernetes API" in facts["error"]


async def test_slack_down_retries_the_message_and_the_retry_does_only_what_is_still_owed(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """A transient Slack failure fails the message (the dispatcher retries it); the retry opens no
    second issue and restarts nothing again, and Slack gets the messages."""
    world = World(store, rules=[RESTART_RULE], **fakes)
    world.notifier.failures.append(TransientError("Slack webhook: 503"))
    with pytest.raises(TransientError):
        await world.handle(firing(incidentd_action="restart"), "m-1")
    await world.handle(firing(incidentd_action="restart"), "m-1")
    assert len(world.tracker.issues) == 2 and world.cluster.restarts == [("shop", "checkout")]
    assert len(world.notifier.sent) == 4


async def test_a_permanent_slack_failure_is_logged_and_the_message_acked(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """A deleted webhook (404 no_service) cannot succeed on retry: logged as side_effect.failed, and the
    handlers return (ACK); the incident itself is in the store."""
    world = World(store, **fakes)
    world.notifier.failures.append(PermanentError("Slack webhook: 404 no_service"))
    with capture_logs() as logs:
        await world.handle(firing(), "m-1")
    [failed] = [e for e in logs if e["event"] == "side_effect.failed"]
    assert (failed["effect"], failed["error"]) == ("slack.notify", "Slack webhook: 404 no_service")
    assert (await world.incident(FIRST)).status == "open"


async def test_transitions_are_commented_and_resolving_closes_the_issue(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """An acknowledgement comments on the issue, the resolution comments and closes it; Slack hears each
    transition; an alert repeating (a new message) tells nobody and opens nothing."""
    world = World(store, **fakes)
    await world.handle(firing(), "m-1")
    await world.handle(firing(), "m-2")  # repeated notification: an occurrence
    ack = AcknowledgeIncident(dedup_key=FIRST, actor="alice", note="on it")
    await world.handle(ack, "m-3")
    await world.handle(resolved(), "m-4")

    issue = world.tracker.issues[int((await world.incident(FIRST)).links[ISSUE_LINK])]
    assert (issue["comments"], issue["state"]) == (["acknowledged", "resolved"], "closed")
    assert [kind for key, kind, _ in world.notifier.sent if key == FIRST] == [
        "opened",
        "acknowledged",
        "resolved",
    ]
    assert len(world.tracker.issues) == 2


async def test_an_oec_custom_action_runs_its_rule_on_the_deployment_its_details_name(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """OEC's restartDeployment, mapped by an oec_action rule, restarts the Deployment named in the
    alert's details; the request and the result are both on the timeline."""
    rule = {"name": "oec-restart", "oec_action": "restartDeployment", "action": "restart"}
    world = World(store, rules=[rule], **fakes)
    data = copy.deepcopy(fixture_json("oec_create"))
    data["action"] = "restartDeployment"
    data["alert"]["details"].update(namespace="shop", deployment="checkout")
    await world.handle(OpsgenieAction.model_validate(data), str(uuid.uuid4()))
    incident = await world.incident("opsgenie:orders-db-replication-lag")
    assert world.cluster.restarts == [("shop", "checkout")]
    assert [(e.actor, e.note) for e in incident.timeline if e.kind == "action"] == [
        ("System", "restartDeployment"),
        ("incidentd", "oec-restart: rollout restart deployment shop/checkout: restartedAt=now"),
    ]


async def test_without_adapters_or_rules_the_side_effects_cost_no_transaction(store: SqliteStore) -> None:
    """Everything off (the default): the follow-up returns before touching the store, so the store handler's
    transaction is the message's only one (the idempotency table holds one key)."""
    world = World(store)
    await world.handle(firing(), "m-1")
    async with store._db.execute("SELECT key FROM processed_messages") as cursor:
        assert [row[0] for row in await cursor.fetchall()] == ["m-1"]


class RevokedTokenTracker(FakeTracker):
    """GitHub answering 401 to every call (a revoked token)."""

    async def open_issue(self, incident: Incident) -> TrackedIssue:
        raise PermanentError("GitHub open issue: 401 Bad credentials")

    async def find_issue(self, incident: Incident) -> TrackedIssue | None:
        raise PermanentError("GitHub list issues: 401 Bad credentials")


async def test_a_bad_github_token_on_the_retry_is_logged_and_the_message_acked(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """A revoked GitHub token and a Slack blip: the retry's look for an earlier attempt's issue fails
    permanently too. Like the open, it is logged as side_effect.failed and the handlers return (ACK, not
    a dead letter for a chat misconfiguration); Slack gets its messages on the retry."""
    world = World(store, **{**fakes, "tracker": RevokedTokenTracker()})
    world.notifier.failures.append(TransientError("Slack webhook: 503"))
    with pytest.raises(TransientError):
        await world.handle(firing(), "m-1")
    with capture_logs() as logs:
        await world.handle(firing(), "m-1")
    failed = [(e["effect"], e["error"]) for e in logs if e["event"] == "side_effect.failed"]
    assert failed == [("github.open_issue", "GitHub list issues: 401 Bad credentials")] * 2
    assert sorted(kind for _, kind, _ in world.notifier.sent) == ["opened", "opened"]


# --- the dispatcher's after-commit step, from the transaction's record ---------------------------------


class NoteOnEach(Command):
    """A command no built-in handler list knows: a note on each incident named by dedup key."""

    TYPE = "test.note-on-each"
    dedup_keys: list[str]
    note: str


async def note_on_each(cmd: NoteOnEach, ctx: Context, store: Any) -> None:
    changes = [ChangedIncident(key) for key in cmd.dedup_keys]
    async with message_transaction(store, ctx, changes) as tx:
        if tx.already_processed:
            return
        for incident in (await tx.latest(cmd.dedup_keys)).values():
            incident.add_note(note=cmd.note, at=datetime.now(UTC), actor="bob", message_id=ctx.message_id)
            await tx.update(incident)


def worker(world: World, **retry: Any) -> Dispatcher:
    """The world's handlers behind a real dispatcher with the after-commit step, as the container wires."""
    handlers = {**HANDLERS, NoteOnEach: [note_on_each]}
    policy = RetryPolicy(**{"in_process_initial": 0.001, "in_process_max": 0.002, **retry})
    return Dispatcher(CommandFactory(handlers), bind(handlers, world.deps), concurrency=2, timeout=10,
                      retry=policy, after_commit=bind_all([after_commit], world.deps))  # fmt: skip


def note_delivery(message_id: str, *keys: str) -> FakeDelivery:
    body = NoteOnEach(dedup_keys=list(keys), note="rolling back 7.1").model_dump_json().encode()
    return FakeDelivery(Message(body, {"type": NoteOnEach.TYPE}, message_id))


async def test_the_after_commit_step_follows_up_every_incident_the_transaction_recorded(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """A handler the side effects know nothing about records the two incidents it changes on its
    transaction: after its commit the dispatcher tells Slack and comments on both GitHub issues."""
    world = World(store, **fakes)
    await world.handle(firing(), "m-1")
    d = worker(world)
    assert (await outcome_of(d, note_delivery("m-2", FIRST, SECOND))).disposition is Disposition.ACK

    assert sorted(sent for sent in world.notifier.sent if sent[1] == "note") == [
        (FIRST, "note", "1"), (SECOND, "note", "2")
    ]  # fmt: skip
    assert [issue["comments"] for issue in world.tracker.issues.values()] == [["note"], ["note"]]


async def test_a_redelivered_message_changes_nothing_and_is_followed_up_from_the_same_record(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """The same message again (an idempotency hit): the store handler changes nothing (one note per
    incident, no second issue), and the record it makes anyway has Slack told again (at-least-once)."""
    world = World(store, **fakes)
    await world.handle(firing(), "m-1")
    d = worker(world)
    for _ in range(2):
        assert (await outcome_of(d, note_delivery("m-2", FIRST))).disposition is Disposition.ACK

    notes = [e for e in (await world.incident(FIRST)).timeline if e.kind == "note"]
    assert len(notes) == 1 and len(world.tracker.issues) == 2
    assert [sent for sent in world.notifier.sent if sent[1] == "note"] == [(FIRST, "note", "1")] * 2


async def test_a_transaction_that_did_not_commit_is_followed_up_by_no_one_until_the_retry(
    store: SqliteStore, fakes: dict[str, Any]
) -> None:
    """The store fails before the note commits: the message is retried and nobody hears of a note that
    is not there; the redelivery commits it and then Slack hears of it once."""
    flaky = FlakyStore(store)
    world = World(flaky, **fakes)
    await world.handle(firing(), "m-1")
    flaky.fail_on = "m-2"
    d = worker(world, in_process_attempts=1)
    assert (await outcome_of(d, note_delivery("m-2", FIRST))).disposition is Disposition.RETRY
    assert [sent for sent in world.notifier.sent if sent[1] == "note"] == []

    assert (await outcome_of(d, note_delivery("m-2", FIRST))).disposition is Disposition.ACK
    assert [sent for sent in world.notifier.sent if sent[1] == "note"] == [(FIRST, "note", "1")]


async def test_a_follow_up_retried_in_process_is_done_once(store: SqliteStore, fakes: dict[str, Any]) -> None:
    """Slack fails once: the after-commit step is part of the attempt, so the dispatcher runs the handlers
    and it again in-process; the retry finds the same record, each incident is announced once, and the
    message is acked."""
    world = World(store, **fakes)
    await world.handle(firing(), "m-1")
    world.notifier.failures.append(TransientError("Slack webhook: 503"))
    d = worker(world)
    assert (await outcome_of(d, note_delivery("m-2", FIRST, SECOND))).disposition is Disposition.ACK
    assert sorted(sent for sent in world.notifier.sent if sent[1] == "note") == [
        (FIRST, "note", "1"), (SECOND, "note", "2")
    ]  # fmt: skip
