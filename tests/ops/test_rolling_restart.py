"""A Deployment rollout under load, with real processes, a real broker and PostgreSQL: nothing is lost
and nothing is applied twice.

Two ``python app.py worker`` processes ("pods") consume a steady stream of Alertmanager batches that
the test publishes for the whole run. They are replaced one at a time the way a rollout with
``maxSurge: 1, maxUnavailable: 0`` does it: start a new pod, wait until its ``/readyz`` is 200, SIGTERM
an old one (while it has messages in flight), and start the next new pod at once, without waiting for
the old one to exit. Then the stream stops, the last pods finish the backlog and are stopped too.

The broker is a parameter: :class:`BrokerVariant` holds the only broker-specific parts (a unique
topology, how to read what is left in it, how to delete it): RabbitMQ on 127.0.0.1:5672 and Pub/Sub on
the official emulator (the session's, tests/standins/pubsub.py). Everything else - the setup Job
(``app.py setup``), publishing, the dead-letter check, the store - goes through the broker-neutral
interfaces. See docs/operations.md#rolling-restarts-proven.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from application.messages import TYPE_ATTR
from application.ports import Broker
from config.container import Container
from config.settings import Settings, load
from tests.contract.broker_contract import eventually
from tests.incidents.conftest import PG_DSN, drop_schema, payload, pg_schema, postgres_available  # noqa: F401
from tests.proxy import proxy_for
from tests.workers import env_of, exit_code, free_port, get, log_events, run_app, sample, worker_process

RATE = 40  # Alertmanager batches per second, for the whole run
ALERTS = 20  # alerts (new fingerprints, so new incidents) per batch: a big Alertmanager group
SERVICES = 8  # batches cycle over this many services (correlation scopes)
CONCURRENCY = 3  # handlers per pod: at RATE, a pod often holds more deliveries than it runs
SHUTDOWN_TIMEOUT = 10.0
# The pods reach PostgreSQL through a proxy that adds this much latency each way (a database one
# network hop away): a batch's transaction makes a few round trips, so a handler takes tens of ms and
# a SIGTERM lands with messages in flight.
DB_LATENCY = 0.005
WARM_UP, COOL_DOWN = 2.0, 2.0  # seconds of stream before the rollout and after the old pods are gone
# No message is handled this much later than the messages published just after it. One that was held by a
# stopped pod's connection until a lease lapsed (Pub/Sub: the tests' 10 s ack deadline) instead of being
# handed back is. A lag relative to its neighbours, not a wait from its publish: on a loaded machine the
# whole stream may queue up for longer than that, and that is slowness, not a held message.
MAX_LAG = 8.0
# While messages are left, the store's processed count must grow at least once in this long: a slow
# machine catches up (however long it takes), a stuck rollout fails.
STALL = 45.0
# The processed-message keys that are message ids: a message's other records (``<id>:settled``, ...) are
# left out.
NO_EXTRA_KEYS = "{} WHERE key NOT LIKE '%:%'"


# --- the broker-specific parts -----------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerVariant:
    name: str
    # Skip (locally) or fail (CI) when the broker is not reachable; may start a session fixture.
    require: Callable[[pytest.FixtureRequest], None]
    topology: Callable[[], dict[str, Any]]  # settings naming a fresh topology of this test's own
    backlog: Callable[[Settings], Awaitable[int]]  # messages left in the main and retry destinations
    delete: Callable[[Settings], Awaitable[None]]  # remove the topology


def rabbitmq() -> BrokerVariant:
    from infra.rabbitmq.topology import Topology
    from tests.rabbitmq.conftest import delete_topology, queue_depth, rabbitmq_available, rabbitmq_settings

    def topology() -> dict[str, Any]:
        names = rabbitmq_settings()
        keys = ("broker", "rabbitmq_url", "rabbitmq_exchange", "rabbitmq_queue")
        return {key: getattr(names, key) for key in keys}

    async def backlog(settings: Settings) -> int:
        # Unacked messages are ready again as soon as their channel closes: the pods have exited.
        t = Topology.from_settings(settings)
        return await queue_depth([t.queue, *t.retry_queues])

    async def delete(settings: Settings) -> None:
        await delete_topology(Topology.from_settings(settings))

    return BrokerVariant("rabbitmq", lambda _: rabbitmq_available(), topology, backlog, delete)


def pubsub() -> BrokerVariant:
    """infra/pubsub on the official emulator (PUBSUB_EMULATOR_HOST reaches the pods through the
    environment), with the tests' 10 s ack deadline and lease extension (tests/pubsub/conftest.py)."""
    from infra.pubsub.topology import Topology
    from tests.pubsub.conftest import backlog as pubsub_backlog
    from tests.pubsub.conftest import delete_topology, pubsub_settings

    def topology() -> dict[str, Any]:
        names = pubsub_settings()
        keys = (
            "broker",
            "pubsub_project",
            "pubsub_topic",
            "pubsub_subscription",
            "pubsub_ack_deadline",
            "pubsub_max_lease_extension",
            "pubsub_retry_min_backoff",
            "pubsub_retry_max_backoff",
        )
        return {key: getattr(names, key) for key in keys}

    async def backlog(settings: Settings) -> int:
        # The main and the retry subscription. A delivery whose ack was lost is invisible until its ack
        # deadline lapses: wait that out first.
        await asyncio.sleep(settings.pubsub_ack_deadline + 1)
        return await pubsub_backlog(Topology.from_settings(settings))

    async def delete(settings: Settings) -> None:
        await delete_topology(Topology.from_settings(settings))

    def require(request: pytest.FixtureRequest) -> None:
        request.getfixturevalue("pubsub_emulator")  # the session's emulator; it skips or fails if missing

    return BrokerVariant("pubsub", require, topology, backlog, delete)


VARIANTS = {"rabbitmq": rabbitmq, "pubsub": pubsub}


@pytest.fixture(params=sorted(VARIANTS))
async def variant(request: pytest.FixtureRequest) -> BrokerVariant:
    chosen = VARIANTS[request.param]()
    chosen.require(request)
    return chosen


@pytest.fixture
async def schema(pg_schema: str) -> AsyncIterator[str]:  # noqa: F811 - the fixture imported above
    postgres_available()
    yield pg_schema
    await drop_schema(pg_schema)


# --- pods ------------------------------------------------------------------------------------------


class Pod:
    """One worker process with an ops port and a log file of its own."""

    def __init__(self, name: str, settings: dict[str, Any], directory: Path, stack: contextlib.ExitStack):
        self.name = name
        self.port = free_port()
        self.log = directory / f"{name}.log"
        env = env_of(settings | {"ops_port": self.port})
        self.process = stack.enter_context(worker_process(env, self.log))
        self.exit_code: int | None = None

    async def ready(self) -> None:
        """Until ``/readyz`` is 200 (the readiness probe that lets a rollout go on)."""

        async def probe() -> bool:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
            try:
                return (await get(f"http://127.0.0.1:{self.port}/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await eventually(probe, timeout=120)  # a loaded machine starts a pod in tens of seconds

    async def busy(self, at_least: int = CONCURRENCY + 1, timeout: float = 5.0) -> None:
        """Until the pod's in-flight and waiting gauges add up to ``at_least`` deliveries (by default:
        every handler slot busy and one more waiting), or ``timeout`` passes; the test then checks what
        the pod itself logged at SIGTERM."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            metrics = (await get(f"http://127.0.0.1:{self.port}/metrics"))[1]
            held = sample(metrics, "incidentd_messages_in_flight") or 0
            if held + (sample(metrics, "incidentd_messages_waiting") or 0) >= at_least:
                return
            await asyncio.sleep(0.005)

    def sigterm(self) -> None:
        self.process.terminate()

    async def exited(self) -> int:
        self.exit_code = await exit_code(self.process, SHUTDOWN_TIMEOUT + 30)
        return self.exit_code

    def event(self, name: str) -> dict[str, Any]:
        found = log_events(self.log, name)
        assert found, f"{self.name} logged no {name}:\n{self.log.read_text()[-3000:]}"
        return found[-1]

    def acked(self) -> list[str]:
        return [e["message_id"] for e in log_events(self.log, "message.acked")]

    def handed_back(self) -> int:
        return len(log_events(self.log, "message.retry"))


# --- the stream ------------------------------------------------------------------------------------


class Stream:
    """Alertmanager batches at a steady rate, each firing ALERTS new fingerprints; publish confirmed."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.published: dict[str, list[str]] = {}  # message id -> the dedup keys it opens
        self.published_at: dict[str, float] = {}  # message id -> wall-clock time its publish was confirmed
        self._template = payload("alertmanager_firing")

    def _batch(self, n: int) -> tuple[bytes, list[str]]:
        service = f"svc-{n % SERVICES}"
        alerts = []
        for a in range(ALERTS):
            alert = dict(self._template["alerts"][0])
            alert["fingerprint"] = f"{n:08x}{a:04x}"
            alert["labels"] = {"alertname": "RollingRestart", "job": service, "env": "test",
                               "severity": "high", "instance": f"{service}-{n}-{a}"}  # fmt: skip
            alerts.append(alert)
        common = {"alertname": "RollingRestart", "env": "test"}
        body = self._template | {"alerts": alerts, "commonLabels": common, "groupLabels": common}
        return json.dumps(body).encode(), [f"alertmanager:{alert['fingerprint']}" for alert in alerts]

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        started, n = loop.time(), 0
        while not stop.is_set():
            body, keys = self._batch(n)
            message_id = await self._broker.publisher.publish(body, {TYPE_ATTR: "alertmanager.webhook"})
            self.published[message_id] = keys
            self.published_at[message_id] = time.time()
            n += 1
            await asyncio.sleep(max(0.0, started + n / RATE - loop.time()))


@contextlib.asynccontextmanager
async def broker_of(settings: Settings) -> AsyncIterator[Broker]:
    container = Container(settings=settings)
    try:
        yield await container.broker()
    finally:
        await container.shutdown_resources()  # type: ignore[misc]


async def setup_job(settings: dict[str, Any]) -> None:
    """``app.py setup``, as the Deployment's one-shot Job runs it: topology and schema."""
    code, out = await run_app(env_of(settings), "setup")
    assert code == 0, out


@contextlib.asynccontextmanager
async def database(schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


async def store_rows(schema: str) -> tuple[list[tuple[str, int, int, str]], dict[str, float]]:
    """(dedup key, occurrences, timeline entries, opening message id) per incident; processed message ids
    with the time (epoch seconds) their handler's transaction began."""
    async with database(schema) as conn:
        incidents = await conn.fetch(
            "SELECT dedup_key, (doc->>'occurrences')::int, json_array_length(doc->'timeline'), "
            "doc->'timeline'->0->>'message_id' FROM incidents"
        )
        processed = await conn.fetch(NO_EXTRA_KEYS.format(
            "SELECT key, extract(epoch FROM processed_at)::float8 FROM processed_messages"
        ))  # fmt: skip
    return [tuple(r) for r in incidents], {r[0]: r[1] for r in processed}


async def processed_count(schema: str) -> int:
    async with database(schema) as conn:
        return int(await conn.fetchval(NO_EXTRA_KEYS.format("SELECT count(*) FROM processed_messages")))


# --- the test --------------------------------------------------------------------------------------


class Pods:
    """The pods of the Deployment, by name, in the order they were started."""

    def __init__(self, settings: dict[str, Any], directory: Path, stack: contextlib.ExitStack) -> None:
        self._settings, self._directory, self._stack = settings, directory, stack
        self.all: dict[str, Pod] = {}

    def start(self, name: str) -> Pod:
        self.all[name] = Pod(name, self._settings, self._directory, self._stack)
        return self.all[name]


async def roll_out(pods: Pods, stream: Stream, schema: str) -> None:
    """Two pods under a steady stream; a rollout with maxSurge 1 / maxUnavailable 0 replaces them; the
    stream stops, the new pods finish the backlog and are stopped in turn."""
    old = [pods.start("old-1"), pods.start("old-2")]
    await asyncio.gather(*(pod.ready() for pod in old))
    stop_stream = asyncio.Event()
    publishing = asyncio.create_task(stream.run(stop_stream))
    await asyncio.sleep(WARM_UP)
    for i, pod in enumerate(old, start=1):
        replacement = pods.start(f"new-{i}")  # the surge pod
        await replacement.ready()
        await pod.busy()
        pod.sigterm()  # the next surge pod starts at once: a terminating pod no longer counts
    await asyncio.gather(*(pod.exited() for pod in old))
    await asyncio.sleep(COOL_DOWN)
    stop_stream.set()
    await publishing
    await all_processed(schema, len(stream.published))
    new = [pods.all["new-1"], pods.all["new-2"]]
    for pod in new:
        pod.sigterm()
    await asyncio.gather(*(pod.exited() for pod in new))


async def all_processed(schema: str, published: int) -> None:
    """Until the store holds every published message; fails only if no message was processed for
    :data:`STALL` seconds while some were left."""
    best, progressed = -1, time.monotonic()
    while (done := await processed_count(schema)) < published:
        if done > best:
            best, progressed = done, time.monotonic()
        elif time.monotonic() - progressed > STALL:
            raise AssertionError(
                f"{published - done} of {published} messages left, none processed in {STALL:g} s"
            )
        await asyncio.sleep(0.2)


def lags(processed: dict[str, float], published_at: dict[str, float]) -> list[float]:
    """Per message: how much later its handler began than the median of the next second's worth of
    messages (in publish order). About 0 for a message handled in turn, however long the queue."""
    order = sorted(published_at, key=published_at.__getitem__)
    out = []
    for i, message_id in enumerate(order):
        later = sorted(processed[m] for m in order[i + 1 : i + 1 + RATE])
        if later:
            out.append(processed[message_id] - later[len(later) // 2])
    return out


def pod_settings(names: dict[str, Any], schema: str, dsn: str) -> dict[str, Any]:
    return names | {
        "store": "postgres", "postgres_dsn": dsn, "postgres_schema": schema, "postgres_pool_max": 4,
        "concurrency": CONCURRENCY, "shutdown_timeout": SHUTDOWN_TIMEOUT, "retry_backoff": [0.2, 0.4],
        "log_level": "info", "ops_enabled": True, "ops_host": "127.0.0.1",
    }  # fmt: skip


@pytest.mark.slow
async def test_a_rolling_restart_under_load_applies_every_message_exactly_once(
    variant: BrokerVariant, schema: str, tmp_path: Path
) -> None:
    """Two pods are replaced one at a time (new pod ready, then SIGTERM to an old one while it has
    messages in flight) as a steady stream of Alertmanager batches is published. Every pod exits 0;
    at the end PostgreSQL holds exactly one incident per published fingerprint, opened by its own
    message and counted once, the idempotency table holds each published message id once, no message
    was handled MAX_LAG after the messages published after it (none sat on a stopped pod until a lease
    lapsed), and the main, retry and dead-letter destinations are empty. Prints each pod's drain time."""
    async with proxy_for(PG_DSN, 5432, delay=DB_LATENCY) as database:
        settings = pod_settings(variant.topology(), schema, database.url(PG_DSN))
        loaded = load(**settings)
        try:
            await setup_job(settings | {"postgres_dsn": PG_DSN})
            async with broker_of(loaded) as broker:
                stream = Stream(broker)
                with contextlib.ExitStack() as stack:
                    pods = Pods(settings, tmp_path, stack)
                    await roll_out(pods, stream, schema)
                letters = await broker.dead_letters.list()
            backlog = await variant.backlog(loaded)
        finally:
            await variant.delete(loaded)
    incidents, processed = await store_rows(schema)

    exits = {name: pod.exit_code for name, pod in pods.all.items()}
    assert set(exits.values()) == {0}, (exits, {n: p.log.read_text()[-2000:] for n, p in pods.all.items()})
    stopping = {name: pod.event("worker.stopping") for name, pod in pods.all.items()}
    stopped = {name: pod.event("worker.stopped") for name, pod in pods.all.items()}
    in_flight_at_sigterm = {name: stopping[name]["in_flight"] for name in ("old-1", "old-2")}
    assert any(n > 0 for n in in_flight_at_sigterm.values()), (
        f"no old pod had a message in flight at SIGTERM ({in_flight_at_sigterm}); the test proved nothing"
    )

    assert all(stopped[name]["cancelled"] == 0 for name in pods.all), "a handler outlived the drain"

    expected = {key: message_id for message_id, keys in stream.published.items() for key in keys}
    assert len(incidents) == len(expected), "one incident per fingerprint, no more, no fewer"
    assert {key: opened_by for key, _, _, opened_by in incidents} == expected
    assert all(occurrences == 1 and entries == 1 for _, occurrences, entries, _ in incidents), (
        "an incident was counted twice: a message's effect was applied more than once"
    )
    assert sorted(processed) == sorted(stream.published), "each message id recorded once"  # a primary key
    waits = sorted(processed[m] - at for m, at in stream.published_at.items())
    lag = sorted(lags(processed, stream.published_at))
    late = sum(x >= MAX_LAG for x in lag)
    assert late == 0, (
        f"{late} messages were handled up to {lag[-1]:.1f} s after those published after them: held by a "
        "stopped pod until a lease lapsed"
    )
    assert backlog == 0, "messages left in the main or retry destinations"
    assert letters == [], [letter.reason for letter in letters]

    acks = collections.Counter(m for pod in pods.all.values() for m in pod.acked())
    print(
        f"\n{variant.name}: published {len(stream.published)} batches ({len(expected)} alerts) at "
        f"{RATE}/s; incidents {len(incidents)}; processed ids {len(processed)}; "
        f"acked more than once (a redelivery, a no-op) {sum(1 for n in acks.values() if n > 1)}"
    )
    print(
        f"  published -> handled: median {waits[len(waits) // 2]:.3f} s, p99 "
        f"{waits[len(waits) * 99 // 100]:.3f} s, max {waits[-1]:.3f} s, over 1 s {sum(w > 1 for w in waits)};"
        f" largest lag behind later messages {lag[-1]:.3f} s"
    )
    for name, pod in pods.all.items():
        print(
            f"  {name}: in flight at SIGTERM {stopping[name]['in_flight']}, drain "
            f"{stopped[name]['drain_seconds']:.3f} s, cancelled {stopped[name]['cancelled']}, "
            f"handed back {pod.handed_back()}, acked {len(pod.acked())}, exit {pod.exit_code}"
        )
