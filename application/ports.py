"""The protocols through which the application reaches the outside world.

Implementations live in ``infra/`` and are wired by ``config/container.py``; unit tests pass in-memory
fakes. A protocol exists here only where the application needs one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol
from uuid import UUID

from application.incidents import Incident, OpenGroup, Status, TimelineEntry
from application.messages import Delivery, Message

# --- incidents --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangedIncident:
    """An incident a message's transaction changes, as the after-commit step finds it again.

    Named by ``dedup_key`` or ``incident_id``. ``trigger`` is what action rules answer: ``"opened"`` for
    an Alertmanager alert (it counts only if this message opened the incident), an OEC action's name,
    or ``""`` for none; ``labels`` are what the rules match.
    """

    dedup_key: str = ""
    incident_id: UUID | None = None
    trigger: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


class Transaction(Protocol):
    """One unit of work on the incident store.

    Entered with an idempotency key: if a transaction under that key already committed,
    ``already_processed`` is true and the handler must change nothing. On a clean exit the changes and
    the key commit together (so a redelivered message has no second effect); on an exception nothing
    is kept.

    ``changes`` is the record of the incidents this message changes, next to the idempotency record:
    the handler fills it whether or not ``already_processed`` (a redelivery must find the same
    follow-ups, application/side_effects.py), and the after-commit step runs from it. The store keeps
    it in memory only.

    Concurrent transactions about the same incident serialise: every read of an incident first locks
    its dedup key for the rest of the transaction (in PostgreSQL an advisory transaction lock, which
    also covers a key that has no incident yet), so a read-modify-write never loses another's update.
    Locks are taken in one fixed order (dedup keys, then correlation scopes), so transactions locking
    overlapping sets never deadlock.
    """

    already_processed: bool
    changes: list[ChangedIncident]

    async def latest(self, dedup_keys: Collection[str]) -> dict[str, Incident]:
        """Lock these dedup keys, and return the most recently created incident of each that has one."""
        ...

    async def get(self, incident_id: UUID) -> Incident | None:
        """The incident with this id, its dedup key locked."""
        ...

    async def open_groups(self, scopes: Collection[tuple[str, str]]) -> list[OpenGroup]:
        """Lock these (service, environment) scopes, and return the correlation groups with unresolved
        incidents in them. Call it after locking every dedup key (always in that order)."""
        ...

    async def add(self, incident: Incident) -> None: ...

    async def update(self, incident: Incident) -> None: ...


class IncidentStore(Protocol):
    def transaction(
        self, idempotency_key: str, dedup_keys: Collection[str] = (), scopes: Collection[tuple[str, str]] = ()
    ) -> AbstractAsyncContextManager[Transaction]:
        """A transaction under ``idempotency_key`` (see :class:`Transaction`).

        ``dedup_keys`` and ``scopes``, when given, announce the handler's first ``latest`` and
        ``open_groups`` calls: the store may lock and read them together with the idempotency record
        (one round trip in PostgreSQL) and serve those calls from what it read. Announce every scope the
        transaction may ask for, or none: what the store locked early it holds to the end, and a later
        lock outside that set would break the one lock order.
        """
        ...

    async def get(self, incident_id: UUID) -> Incident | None: ...

    async def list(
        self, *, status: Status | None = None, service: str | None = None, limit: int = 1000
    ) -> list[Incident]: ...

    async def count(self, *, status: Status | None = None, service: str | None = None) -> int:
        """How many incidents :meth:`list` would return without its limit."""
        ...

    async def count_active(self) -> dict[tuple[str, str], int]:
        """Unresolved incidents per (severity, service), for the active-incidents gauge."""
        ...

    async def ping(self) -> None:
        """Raise if the store cannot be reached (used by the readiness probe)."""
        ...


@dataclass(frozen=True)
class IncidentQuery:
    """What the incident API and the dashboard ask a store for: filters, newest first, one page.

    ``after`` is the keyset cursor: the (created_at, id) of the last incident of the previous page; the
    page holds the incidents strictly after it in the order (created_at, id) descending. Neither changes
    once an incident exists, so paging while incidents are added never repeats or skips one that was
    already there. ``title`` matches a case-insensitive substring of the title.
    """

    statuses: tuple[Status, ...] = ()
    service: str | None = None
    environment: str | None = None
    severity: str | None = None
    correlation_group: str | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    title: str | None = None
    limit: int = 50
    after: tuple[datetime, UUID] | None = None


@dataclass(frozen=True)
class ServiceStats:
    """One service's incidents created in a window: how many, how many acknowledged / resolved, and the
    mean time to acknowledge / resolve (seconds from creation; None when none was)."""

    service: str
    incidents: int
    acknowledged: int
    resolved: int
    mtta_seconds: float | None
    mttr_seconds: float | None


class IncidentReader(Protocol):
    """The read side the HTTP API and the dashboard use; they never write (the worker is the one writer)."""

    async def get(self, incident_id: UUID) -> Incident | None: ...

    async def search(self, query: IncidentQuery) -> list[Incident]:
        """At most ``query.limit`` incidents, newest first (created_at, then id, descending)."""
        ...

    async def service_stats(self, since: datetime) -> list[ServiceStats]:
        """Per service, the incidents created at or after ``since``."""
        ...

    async def count_active(self) -> dict[tuple[str, str], int]: ...


class IncidentObserver(Protocol):
    """Told about each incident a transaction added or changed, after the commit (metrics).

    ``previous`` is the status before the transaction (None for a new incident). Called once per
    committed change: a redelivered message that changes nothing is not reported again.
    """

    def changed(self, incident: Incident, previous: Status | None) -> None: ...


@dataclass(frozen=True)
class ActionTrigger:
    """An event that action rules may answer: an alert that opened an incident (``event="opened"``), or
    an Opsgenie OEC action by its name (``"restartDeployment"``). ``labels`` are the alert's labels (OEC:
    the alert's details); rules match on them and read their targets from them."""

    event: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedAction:
    """One action a rule calls for, resolved against its trigger (the target and arguments are known).

    ``rule`` names the rule on the incident's timeline; ``target`` says what is acted on ("deployment
    shop/checkout"): one message runs each (rule, target) once, however many of its incidents ask.
    ``problem``, when set, says why the action cannot run (e.g. the alert names no Deployment).
    """

    rule: str
    action: str
    target: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    problem: str = ""


class ActionRunner(Protocol):
    """Action rules: which actions an event calls for, and running them (application/actions.py).

    The handlers run actions after the store commit, never inside a transaction, and record each result
    on the incident's timeline (application/side_effects.py).
    """

    def plan(self, trigger: ActionTrigger) -> list[PlannedAction]:
        """The actions of the rules this trigger matches, in configuration order."""
        ...

    async def run(self, action: PlannedAction, incident: Incident) -> str:
        """Do it (or, in dry-run, say what would be done); return the result for the timeline.

        Raises TransientError (retry later: the action is still owed) or PermanentError (recorded as
        failed; retrying cannot help).
        """
        ...


# --- brokers ----------------------------------------------------------------------------------------


class Subscriber(Protocol):
    """Consumes from one broker destination and hands each delivery to ``on_delivery``.

    ``on_delivery`` is called on the event loop's thread and must not block. ``stop`` stops taking new
    deliveries; deliveries received but not yet handed over go back to the broker at once. ``close``
    flushes whatever settles are still buffered (coalesced acks) and releases the consumer.
    """

    @property
    def connected(self) -> bool: ...

    async def start(self, on_delivery: Callable[[Delivery], None]) -> None: ...

    async def stop(self) -> None: ...

    async def close(self) -> None: ...


class Publisher(Protocol):
    async def publish(
        self, body: bytes, attributes: Mapping[str, str], *, message_id: str | None = None
    ) -> str:
        """Publish and wait for the broker's confirmation; return the message id. Raise on failure."""
        ...


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letter destination, as ``dlq list`` shows it."""

    message_id: str
    body: bytes
    attributes: Mapping[str, str]
    reason: str
    error: str = ""
    attempts: int = 1
    first_seen: datetime | None = None
    dead_lettered_at: datetime | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    # Copies of this message (same message id) in the dead-letter destination: more than 1 when a worker
    # died between publishing the dead-letter copy and acking the original. Listed and replayed once.
    copies: int = 1


@dataclass
class ReplayReport:
    """What ``dlq replay`` did (or, with ``dry_run``, would do)."""

    replayed: list[str] = field(default_factory=list)  # message ids published back to the main destination
    invalid: dict[str, str] = field(default_factory=dict)  # message id -> why it stays dead-lettered


class DeadLetterQueue(Protocol):
    async def list(self, *, limit: int | None = None) -> list[DeadLetter]:
        """Oldest first; reading does not remove anything."""
        ...

    async def replay(
        self, *, validate: Callable[[Message], object], limit: int | None = None, dry_run: bool = False
    ) -> ReplayReport:
        """Move dead letters back to the main destination, oldest first.

        ``validate`` (the factory's decode) raises for a message that would fail again; such a message
        stays dead-lettered and is reported. Each replayed copy carries provenance attributes
        (``x-incidentd-replayed-at``, the original reason) and starts again at attempt 1; it is published
        and confirmed before it is removed from the dead-letter destination.
        """
        ...

    async def purge(self, *, limit: int | None = None, dry_run: bool = False) -> int:
        """Delete dead letters, oldest first; return how many (would be) deleted."""
        ...


class Broker(Protocol):
    """What the container provides for the configured broker (memory, rabbitmq or pubsub)."""

    @property
    def subscriber(self) -> Subscriber: ...

    @property
    def publisher(self) -> Publisher: ...

    @property
    def dead_letters(self) -> DeadLetterQueue: ...

    async def setup(self) -> None:
        """Declare / create the broker's topology; idempotent."""
        ...


class EmbeddedBroker(Broker, Protocol):
    """A broker whose whole queue lives in this process (``infra/memory``): a caller can wait until it is
    idle instead of waiting for a time (``worker --from``, the example, tests and benchmarks)."""

    async def wait_idle(self) -> None:
        """Return once nothing is queued, scheduled for redelivery, or delivered and not settled."""
        ...


# --- adapters: Kubernetes and AWS ------------------------------------------------------------------
# Implemented by infra/kubernetes.py and infra/aws.py. Every method has a timeout and raises only
# TransientError / PermanentError (application.errors) for failures it can classify.

RolloutState = Literal["complete", "progressing", "stalled"]


@dataclass(frozen=True)
class Missing:
    """What an alert names but the cluster does not have; recorded on the incident, never retried."""

    kind: Literal["Namespace", "Deployment"]
    namespace: str
    name: str = ""

    def __str__(self) -> str:
        target = f"{self.namespace}/{self.name}" if self.name else self.namespace
        return f"{self.kind} {target} does not exist"


@dataclass(frozen=True)
class DeploymentStatus:
    """What an incident is enriched with; ``rollout`` follows ``kubectl rollout status``."""

    namespace: str
    name: str
    desired_replicas: int
    ready_replicas: int
    updated_replicas: int
    available_replicas: int
    images: tuple[str, ...]
    rollout: RolloutState
    # From the pod template's kubectl.kubernetes.io/restartedAt annotation (set by `rollout restart`).
    last_restart: datetime | None = None
    paused: bool = False


@dataclass(frozen=True)
class ActionResult:
    """What an action did (or, in dry-run, would have done), for the incident's timeline."""

    action: str
    target: str
    detail: str = ""
    dry_run: bool = False

    def __str__(self) -> str:
        text = f"{self.action} {self.target}" + (f": {self.detail}" if self.detail else "")
        return f"{text} (dry run, nothing changed)" if self.dry_run else text


class Cluster(Protocol):
    """The Kubernetes cluster incidentd runs in (or is configured for)."""

    async def namespace_exists(self, namespace: str) -> bool: ...

    async def deployment_status(self, namespace: str, name: str) -> DeploymentStatus | Missing: ...

    async def rollout_restart(self, namespace: str, name: str) -> ActionResult:
        """What ``kubectl rollout restart deployment/<name>`` does; PermanentError if it is missing."""
        ...

    async def scale(self, namespace: str, name: str, replicas: int) -> ActionResult: ...


@dataclass(frozen=True)
class Instance:
    instance_id: str
    state: str  # pending | running | stopping | stopped | shutting-down | terminated
    instance_type: str = ""
    availability_zone: str = ""
    launch_time: datetime | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


class Cloud(Protocol):
    """The AWS account incidentd acts on and archives to."""

    async def describe_instances(self, instance_ids: Sequence[str]) -> list[Instance]: ...

    async def reboot_instances(self, instance_ids: Sequence[str]) -> ActionResult: ...

    async def archive(
        self, document: Mapping[str, Any], *, id: str, at: datetime, kind: str = "incidents"
    ) -> str:
        """Store ``document`` as JSON under ``<kind>/<yyyy>/<mm>/<dd>/<id>.json``; return its s3:// URI."""
        ...

    async def put_metric(
        self, name: str, value: float, *, unit: str = "Count", dimensions: Mapping[str, str] | None = None
    ) -> None: ...

    async def invoke_lambda(self, function: str, payload: Mapping[str, Any]) -> ActionResult:
        """Asynchronous ("Event") invocation: returns once Lambda has queued the event."""
        ...


# --- adapters: issue tracker, chat notifier --------------------------------------------------------


@dataclass(frozen=True)
class TrackedIssue:
    """An issue opened for an incident. Handlers store both in ``incident.links`` (see ISSUE_LINK)."""

    number: int
    url: str


# Keys under which handlers store a tracked issue on the incident; the notifier links to the URL.
ISSUE_LINK = "github_issue"
ISSUE_URL_LINK = "github_issue_url"


class IssueTracker(Protocol):
    """Opens one issue per incident, comments on its transitions and closes it when it is resolved.

    Redelivery-safe together with the handlers (application/side_effects.py): they store the returned
    issue in ``incident.links`` right after opening it, ``open_issue`` returns an issue already named
    there without a call, and a retry first looks for an issue an earlier attempt opened
    (``find_issue``).
    """

    def tracks(self, incident: Incident) -> bool:
        """Whether this incident gets an issue at all (e.g. severity at least ``critical``)."""
        ...

    async def open_issue(self, incident: Incident) -> TrackedIssue: ...

    async def find_issue(self, incident: Incident) -> TrackedIssue | None:
        """The issue an earlier attempt opened for this incident, found by its marker, if any.

        For a retry whose earlier attempt may have opened the issue without storing it; reads the
        repository's issue list (consistent, unlike the search index).
        """
        ...

    async def comment(self, incident: Incident, entry: TimelineEntry) -> None: ...

    async def close_issue(self, incident: Incident, entry: TimelineEntry) -> None: ...


class Notifier(Protocol):
    """Tells people about one transition of an incident (the ``entry`` just appended to its timeline)."""

    async def notify(self, incident: Incident, entry: TimelineEntry) -> None: ...


# --- AI analysis (application/analysis.py, docs/ai.md) ---------------------------------------------


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation with a model: ``role`` is ``user`` or ``assistant``."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class AnalystReply:
    """What a model answered, and what it cost. ``truncated``: it stopped at the output token limit."""

    text: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    truncated: bool = False


class Analyst(Protocol):
    """A chat model (infra/ai/: Bedrock Converse, any OpenAI-compatible endpoint).

    One call, no tools: the model reads text and answers text, so it can suggest and never act.
    Raises TransientError for timeouts, throttling (``retry_after`` from the endpoint) and 5xx, and
    PermanentError for what retrying cannot fix (bad key, unknown model, invalid request).
    """

    @property
    def name(self) -> str:
        """``provider/model``, for the timeline and the metrics."""
        ...

    async def complete(self, system: str, turns: Sequence[ChatTurn], *, max_tokens: int) -> AnalystReply: ...


@dataclass(frozen=True)
class Passage:
    """A section of a runbook. ``id`` is what an answer cites (``postgres-connections.md#pool-exhausted``)."""

    id: str
    source: str  # the file, relative to the knowledge folder
    heading: str
    text: str
    score: float = 0.0


class KnowledgeBase(Protocol):
    """Runbook passages ranked for a query (infra/ai/knowledge.py: BM25 over a folder of markdown)."""

    async def search(self, query: str, k: int) -> list[Passage]: ...
