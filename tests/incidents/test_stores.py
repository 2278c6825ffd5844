"""The store contract: effectively-once processing and serialisation, through the real dispatcher.

:class:`StoreContract` runs on SQLite and on PostgreSQL (real server; a missing one fails in CI).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from application.dispatcher import Dispatcher, RetryPolicy, bind
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident, IncidentPolicy, Status
from application.messages import TYPE_ATTR, Disposition, Message, Outcome
from infra.sqlite.store import SqliteStore
from tests.incidents.conftest import PG_DSN, drop_schema, payload, postgres_available
from tests.standins.noop_actions import adapters_off


class Delivery:
    """A delivery whose settle can fail, as when the broker connection drops right after the commit."""

    def __init__(self, message: Message, settle_fails: bool = False) -> None:
        self.message = message
        self.outcome: Outcome | None = None
        self.settled = asyncio.Event()
        self._settle_fails = settle_fails

    async def settle(self, outcome: Outcome) -> None:
        self.settled.set()
        if self._settle_fails:
            raise ConnectionError("connection lost before the ack")
        self.outcome = outcome

    async def ack(self) -> None:  # what application.settle calls
        await self.settle(Outcome.ack())

    async def requeue(self) -> None:
        await self.settle(Outcome.retry(0.0, "requeued"))

    async def publish_copy(self, attributes: object, outcome: Outcome) -> None:
        await self.settle(outcome)


def firing(fingerprint: str = "fp-1", message_id: str | None = None, **alert: Any) -> Message:
    data = payload("alertmanager_firing")
    data["alerts"] = [{**data["alerts"][0], "fingerprint": fingerprint, **alert}]
    return Message(
        json.dumps(data).encode(), {TYPE_ATTR: "alertmanager.webhook"}, message_id or uuid.uuid4().hex
    )


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, Status | None, Status]] = []

    def changed(self, incident: Incident, previous: Status | None) -> None:
        self.changes.append((incident.dedup_key, previous, incident.status))


class StoreContract:
    """Subclasses provide ``store`` (a fresh, empty store) and ``recorder`` (its observer)."""

    @pytest.fixture
    def recorder(self) -> Recorder:
        return Recorder()

    def dispatcher(self, store: Any, concurrency: int = 16) -> Dispatcher:
        deps = {"store": store, "policy": IncidentPolicy(), **adapters_off()}
        return Dispatcher(
            CommandFactory(HANDLERS), bind(HANDLERS, deps), concurrency=concurrency, timeout=30,
            retry=RetryPolicy(max_attempts=5, in_process_attempts=5, in_process_initial=0.01),
        )  # fmt: skip

    async def deliver(self, store: Any, *deliveries: Delivery, concurrency: int = 16) -> None:
        dispatcher = self.dispatcher(store, concurrency)
        for delivery in deliveries:
            dispatcher.submit(delivery)
        async with asyncio.timeout(60):
            await asyncio.gather(*(d.settled.wait() for d in deliveries))
            await dispatcher.drain(5)

    async def test_redelivered_message_changes_nothing(self, store: Any, recorder: Recorder) -> None:
        """The same message delivered twice counts one occurrence and reports one change."""
        message = firing()
        await self.deliver(store, Delivery(message))
        await self.deliver(store, Delivery(message))
        [incident] = await store.list()
        assert incident.occurrences == 1 and len(incident.timeline) == 1
        assert recorder.changes == [("alertmanager:fp-1", None, "open")]

    async def test_crash_between_commit_and_ack_leaves_no_duplicate(self, store: Any) -> None:
        """The handler committed but the ack never reached the broker; its redelivery is a no-op and acks."""
        message = firing()
        await self.deliver(store, first := Delivery(message, settle_fails=True))
        assert first.outcome is None  # never acked
        await self.deliver(store, again := Delivery(message))
        assert again.outcome is not None and again.outcome.disposition is Disposition.ACK
        [incident] = await store.list()
        assert incident.occurrences == 1

    async def test_concurrent_messages_about_one_incident_serialise(self, store: Any) -> None:
        """40 different messages firing one new fingerprint at once open one incident and count 40
        occurrences - none lost to a concurrent read-modify-write, no duplicate incident."""
        deliveries = [Delivery(firing("fp-hot")) for _ in range(40)]
        await self.deliver(store, *deliveries)
        assert {d.outcome.disposition for d in deliveries if d.outcome} == {Disposition.ACK}
        [incident] = await store.list()
        assert incident.occurrences == 40 and len(incident.timeline) == 40

    async def test_concurrent_copies_of_one_message_count_once(self, store: Any) -> None:
        """Copies of one message delivered at the same time (two consumers) have one effect."""
        message = firing("fp-copy")
        deliveries = [Delivery(message) for _ in range(5)]
        await self.deliver(store, *deliveries)
        [incident] = await store.list()
        assert incident.occurrences == 1

    async def test_concurrent_new_incidents_in_one_scope_share_a_group(self, store: Any) -> None:
        """Ten alerts of one service/environment opened at once all join one correlation group."""
        await self.deliver(store, *(Delivery(firing(f"fp-{n}")) for n in range(10)))
        incidents = await store.list()
        assert len(incidents) == 10 and len({i.correlation_group for i in incidents}) == 1

    async def test_failed_transaction_keeps_nothing(self, store: Any) -> None:
        """An exception inside the transaction keeps neither the changes nor the idempotency key."""
        with pytest.raises(RuntimeError):
            async with store.transaction("key-1") as tx:
                incident = Incident.open(
                    at=_now(), actor="t", message_id="m", title="x", source="manual", dedup_key="k"
                )
                await tx.add(incident)
                raise RuntimeError("handler bug")
        assert await store.list() == []
        async with store.transaction("key-1") as tx:
            assert not tx.already_processed

    async def test_reads_filter_and_count(self, store: Any) -> None:
        """list filters by status and service; get finds by id; count_active counts by severity, service."""
        await self.deliver(
            store,
            Delivery(firing("fp-a")),
            Delivery(firing("fp-b", labels={"job": "cart", "severity": "low"})),
        )
        resolved = payload("alertmanager_resolved")["alerts"][0] | {"fingerprint": "fp-a"}
        data = payload("alertmanager_resolved") | {"alerts": [resolved]}
        await self.deliver(
            store, Delivery(Message(json.dumps(data).encode(), {TYPE_ATTR: "alertmanager.webhook"}, "r"))
        )
        assert [i.dedup_key for i in await store.list(status="resolved")] == ["alertmanager:fp-a"]
        [cart] = await store.list(service="cart")
        assert (await store.get(cart.id)).dedup_key == "alertmanager:fp-b"
        assert await store.count_active() == {("low", "cart"): 1}

    async def test_one_message_resolving_and_reopening_writes_both(self, store: Any) -> None:
        """One batch that resolves an open incident and then fires again later keeps both: the resolved
        incident and its successor, the latest of its key (the store writes them in that order)."""
        fired = payload("alertmanager_firing")["alerts"][0] | {"fingerprint": "fp-r"}
        await self.deliver(store, Delivery(firing("fp-r", startsAt=fired["startsAt"])))
        resolved = payload("alertmanager_resolved")["alerts"][0] | {"fingerprint": "fp-r"}
        again = fired | {"startsAt": "2026-11-23T11:00:00Z"}
        data = payload("alertmanager_firing") | {"alerts": [resolved, again]}
        body = json.dumps(data).encode()
        await self.deliver(store, Delivery(Message(body, {TYPE_ATTR: "alertmanager.webhook"}, "both")))
        latest, first = await store.list()
        assert (first.status, latest.status) == ("resolved", "open")
        assert latest.predecessor == first.id
        async with store.transaction("read", ["alertmanager:fp-r"]) as tx:
            assert (await tx.latest(["alertmanager:fp-r"]))["alertmanager:fp-r"].id == latest.id

    async def test_announced_keys_are_read_like_unannounced_ones(self, store: Any) -> None:
        """A transaction told its dedup keys and scopes up front returns what one told nothing returns."""
        await self.deliver(store, Delivery(firing("fp-a")), Delivery(firing("fp-b")))
        keys, scopes = (
            ["alertmanager:fp-a", "alertmanager:fp-b", "alertmanager:none"],
            [("checkout", "production")],
        )
        async with store.transaction("told", keys, scopes) as told:
            announced = (await told.latest(keys), await told.open_groups(scopes))
        async with store.transaction("not-told") as plain:
            unannounced = (await plain.latest(keys), await plain.open_groups(scopes))
        assert announced == unannounced
        assert set(announced[0]) == {"alertmanager:fp-a", "alertmanager:fp-b"} and len(announced[1]) == 1


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


class TestSqliteStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Any, recorder: Recorder) -> AsyncIterator[SqliteStore]:
        store = await SqliteStore.open(tmp_path / "incidents.db", recorder)
        yield store
        await store.close()

    async def test_a_transaction_cancelled_while_it_begins_leaves_the_store_usable(
        self, store: SqliteStore, tmp_path: Any
    ) -> None:
        """A handler cancelled (command timeout, shutdown deadline) while its BEGIN waits for SQLite's
        write lock: the BEGIN still runs on aiosqlite's thread once the lock is free, and is rolled back,
        so the next message's transaction starts (instead of every later one failing with "cannot start
        a transaction within a transaction")."""
        other = sqlite3.connect(tmp_path / "incidents.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # e.g. the dead-letter store's connection, writing

        async def begin() -> None:
            async with store.transaction("m-1"):
                raise AssertionError("the transaction cannot have begun")

        task = asyncio.create_task(begin())
        await asyncio.sleep(0.2)  # its BEGIN is queued on the thread, waiting for the lock (busy_timeout 5 s)
        task.cancel()
        await asyncio.sleep(0)  # the task handles its cancellation before the lock is freed
        other.execute("ROLLBACK")
        other.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with store.transaction("m-2") as tx:
            assert not tx.already_processed
        async with store.transaction("m-1") as tx:
            assert not tx.already_processed, "the cancelled message recorded nothing"


class TestPostgresStore(StoreContract):
    @pytest.fixture
    async def store(self, pg_schema: str, recorder: Recorder) -> AsyncIterator[Any]:
        postgres_available()
        from infra.postgres.store import PostgresStore

        store = await PostgresStore.open(PG_DSN, schema=pg_schema, min_size=1, max_size=10, observer=recorder)
        yield store
        await store.close()
        await drop_schema(pg_schema)

    async def test_incidents_stored_before_the_later_migrations_are_read_after_them(
        self, pg_schema: str, tmp_path: Any
    ) -> None:
        """A schema at migration 0002 with incidents in it is brought up to date at start-up, and the
        store reads and updates those incidents (the document column changed from jsonb to json)."""
        postgres_available()
        import shutil

        import asyncpg

        from infra.postgres.migrate import MIGRATIONS, migrate
        from infra.postgres.store import PostgresStore

        for name in ("0001_incidents.sql", "0002_lock_and_read.sql"):
            shutil.copy(MIGRATIONS / name, tmp_path / name)
        try:
            conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
            try:
                await migrate(conn, pg_schema, tmp_path)
                incident = Incident.open(at=_now(), actor="t", message_id="m", title="old", source="manual",
                                         dedup_key="k", service="svc")  # fmt: skip
                await conn.execute(
                    "INSERT INTO incidents (id, dedup_key, status, severity, service, created_at, "
                    "last_event_at, doc) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)",
                    incident.id, "k", "open", "medium", "svc", incident.created_at, incident.created_at,
                    incident.model_dump_json(),
                )  # fmt: skip
            finally:
                await conn.close()
            store = await PostgresStore.open(PG_DSN, schema=pg_schema, min_size=1, max_size=2)
            try:
                assert await store.get(incident.id) == incident
                async with store.transaction("later", ["k"], [("svc", "")]) as tx:
                    found = (await tx.latest(["k"]))["k"]
                    found.record_occurrence(at=_now(), actor="t", message_id="n")
                    await tx.update(found)
                [after] = await store.list()
                assert after.id == incident.id and after.occurrences == 2
            finally:
                await store.close()
        finally:
            await drop_schema(pg_schema)

    async def test_pods_starting_at_once_apply_each_migration_once(self, pg_schema: str) -> None:
        """Three stores opening a fresh schema at the same time all start; each migration is recorded once."""
        postgres_available()
        import asyncpg

        from infra.postgres.store import PostgresStore

        try:
            stores = await asyncio.gather(
                *(PostgresStore.open(PG_DSN, schema=pg_schema, min_size=1, max_size=2) for _ in range(3))
            )
            for store in stores:
                await store.close()
            conn = await asyncpg.connect(PG_DSN)
            try:
                rows = await conn.fetch(f'SELECT version FROM "{pg_schema}".schema_migrations')
            finally:
                await conn.close()
            assert [r["version"] for r in rows] == [
                "0001_incidents",
                "0002_lock_and_read",
                "0003_begin_in_one_round_trip",
                "0004_doc_as_json",
                "0005_retention",
                "0006_incident_pages",
                "0007_hot_occurrences",
            ]
        finally:
            await drop_schema(pg_schema)
