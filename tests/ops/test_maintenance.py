"""Retention of processed_messages (infra/maintenance.py) on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app import cli
from application.incidents import Incident
from config.settings import SettingsError, load
from infra.aws import AwsCloud, archive_key
from infra.maintenance import Maintenance
from infra.sqlite.store import PRUNE_BATCH_MAX, SqliteStore
from tests.adapters import conftest as adapters
from tests.contract.broker_contract import eventually
from tests.incidents.conftest import PG_DSN, drop_schema, postgres_available
from tests.workers import env_of, log_events, sigterm, worker_process

# moto's S3 on loopback and an archive bucket, the fixtures of tests/adapters
moto_url, aws_env, aws, bucket, cloud = (adapters.moto_url, adapters.aws_env, adapters.aws, adapters.bucket,
                                         adapters.cloud)  # fmt: skip
NOW = datetime.now(UTC)
RETENTION = timedelta(days=45)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        sqlite = await SqliteStore.open(tmp_path / "incidentd.db")
        yield sqlite
        await sqlite.close()
        return
    postgres_available()
    from infra.postgres.store import PostgresStore

    schema = f"maintenance_test_{uuid.uuid4().hex[:12]}"
    postgres = await PostgresStore.open(PG_DSN, schema=schema, min_size=1, max_size=4)
    yield postgres
    await postgres.close()
    await drop_schema(schema)


async def seed(store: Any, keys: list[str], at: datetime) -> None:
    """Record idempotency keys as processed at ``at`` (the stores stamp the current time themselves)."""
    if isinstance(store, SqliteStore):
        await store._db.executemany(
            "INSERT INTO processed_messages (key, processed_at) VALUES (?, ?)",
            [(k, at.astimezone(UTC).isoformat()) for k in keys],
        )
    else:
        await store._pool.executemany(
            "INSERT INTO processed_messages (key, processed_at) VALUES ($1, $2)", [(k, at) for k in keys]
        )


async def processed(store: Any, key: str) -> bool:
    """Whether ``key`` counts as processed: a transaction under it would change nothing."""
    async with store.transaction(key) as tx:
        return bool(tx.already_processed)


async def count(store: Any) -> int:
    if isinstance(store, SqliteStore):
        async with store._db.execute("SELECT count(*) FROM processed_messages") as cursor:
            row = await cursor.fetchone()
            return int(row[0]) if row else 0
    return int(await store._pool.fetchval("SELECT count(*) FROM processed_messages"))


async def test_keys_older_than_the_retention_are_pruned_and_newer_ones_kept(store: Any) -> None:
    """After a run, a redelivery of a message handled 50 days ago would be handled again (its key is
    gone), while one handled 40 days ago or just now is still recognised as a duplicate. The old keys go
    in several batches (batch size 7 for 25 keys), all of them."""
    old = [f"old-{i}" for i in range(25)]
    await seed(store, old, NOW - timedelta(days=50))
    await seed(store, ["recent"], NOW - timedelta(days=40))
    async with store.transaction("handled-now"):
        pass

    report = await Maintenance(store, processed_retention=RETENTION, batch_size=7).run()

    assert (report.pruned, report.locked_out) == (25, False)
    assert await count(store) == 2
    assert await processed(store, "recent") and await processed(store, "handled-now")
    assert not await processed(store, "old-3")


async def test_sqlite_prunes_in_short_transactions_and_still_prunes_everything(tmp_path: Path) -> None:
    """SQLite deletes at most PRUNE_BATCH_MAX keys per transaction whatever the batch setting (handlers
    wait for its one writer meanwhile), and a run still deletes every old key."""
    store = await SqliteStore.open(tmp_path / "incidentd.db")
    try:
        await seed(store, [f"old-{i}" for i in range(2 * PRUNE_BATCH_MAX + 500)], NOW - timedelta(days=50))
        assert await store.prune_processed(NOW - RETENTION, 5000) == PRUNE_BATCH_MAX
        report = await Maintenance(store, processed_retention=RETENTION, batch_size=5000).run()
        assert report.pruned == PRUNE_BATCH_MAX + 500 and await count(store) == 0
    finally:
        await store.close()


async def test_without_retention_nothing_is_pruned(store: Any) -> None:
    """processed_messages_retention_days=0 keeps every key for ever."""
    await seed(store, ["ancient"], NOW - timedelta(days=3650))
    report = await Maintenance(store, processed_retention=None, batch_size=10).run()
    assert report.pruned == 0 and await processed(store, "ancient")


async def test_only_one_process_prunes_a_postgres_schema_at_a_time(tmp_path: Path) -> None:
    """Two worker pods on one schema: while one holds the maintenance lock, the other's run does nothing
    and says so; once it is released, the other prunes. Another schema is not affected by the lock."""
    postgres_available()
    from infra.postgres.store import PostgresStore

    schema, other_schema = (f"maintenance_test_{uuid.uuid4().hex[:12]}" for _ in range(2))
    first, second, other = [
        await PostgresStore.open(PG_DSN, schema=s, min_size=1, max_size=2)
        for s in (schema, schema, other_schema)
    ]
    try:
        await seed(first, ["old"], NOW - timedelta(days=50))
        await seed(other, ["old"], NOW - timedelta(days=50))
        async with first.maintenance_lock() as held:
            assert held
            blocked = await Maintenance(second, processed_retention=RETENTION, batch_size=10).run()
            elsewhere = await Maintenance(other, processed_retention=RETENTION, batch_size=10).run()
        assert blocked.locked_out and blocked.pruned == 0
        assert "another process" in blocked.summary()
        assert (elsewhere.locked_out, elsewhere.pruned) == (False, 1)
        after = await Maintenance(second, processed_retention=RETENTION, batch_size=10).run()
        assert (after.locked_out, after.pruned) == (False, 1)
    finally:
        for store in (first, second, other):
            await store.close()
        for s in (schema, other_schema):
            await drop_schema(s)


async def test_the_worker_prunes_every_maintenance_interval(tmp_path: Path) -> None:
    """`python app.py worker` with maintenance_interval set prunes on its own: an old key disappears
    without any command being run, a recent one stays; SIGTERM still stops it cleanly (exit 0)."""
    db = tmp_path / "incidentd.db"
    store = await SqliteStore.open(db)
    try:
        await seed(store, ["old"], NOW - timedelta(days=50))
        await seed(store, ["recent"], NOW)
        env = env_of({"sqlite_path": str(db), "maintenance_interval": "0.2", "ops_host": "127.0.0.1",
                      "ops_port": "0", "broker": "memory", "store": "sqlite"})  # fmt: skip
        with worker_process(env, tmp_path / "worker.log") as worker:

            async def only_the_recent_key_left() -> bool:
                return await count(store) == 1

            await eventually(only_the_recent_key_left, timeout=60)
            assert await sigterm(worker) == 0
        assert await processed(store, "recent")
        assert log_events(tmp_path / "worker.log", "maintenance.done")
    finally:
        await store.close()


def test_the_maintenance_command_prunes_and_reports(tmp_path: Path) -> None:
    """`python app.py maintenance` prunes once and prints what it did; retention comes from the settings."""
    db = tmp_path / "incidentd.db"

    async def prepare() -> None:
        store = await SqliteStore.open(db)
        await seed(store, ["a", "b", "c"], NOW - timedelta(days=20))
        await store.close()

    asyncio.run(prepare())
    env = {"INCIDENTD_SQLITE_PATH": str(db), "INCIDENTD_PROCESSED_MESSAGES_RETENTION_DAYS": "10"}
    result = CliRunner().invoke(cli, ["maintenance"], env=env)
    assert result.exit_code == 0, result.output
    assert "pruned 3 processed-message keys" in result.output
    again = CliRunner().invoke(cli, ["maintenance"], env=env)
    assert "pruned 0 processed-message keys" in again.output


# --- incident retention and archival to S3 (moto on loopback, as in tests/adapters) --------------------

INCIDENT_RETENTION = timedelta(days=90)


async def add_incident(store: Any, *, opened_days_ago: float, resolved_days_ago: float | None) -> Incident:
    """An incident opened (and resolved) that many days ago, written through a store transaction."""
    incident = Incident.open(
        at=NOW - timedelta(days=opened_days_ago), actor="test", message_id=uuid.uuid4().hex,
        title="disk full", source="manual", dedup_key=uuid.uuid4().hex, service="db",
    )  # fmt: skip
    if resolved_days_ago is not None:
        incident.resolve(at=NOW - timedelta(days=resolved_days_ago), actor="test", message_id="r")
    async with store.transaction(uuid.uuid4().hex) as tx:
        await tx.add(incident)
    return incident


async def archived_object(aws: Any, bucket: str, incident: Incident) -> dict[str, Any] | None:
    key = archive_key("incidents", str(incident.id), incident.created_at)
    async with aws("s3") as s3:
        try:
            stored = await s3.get_object(Bucket=bucket, Key=key)
        except s3.exceptions.NoSuchKey:
            return None
        return dict(json.loads(await stored["Body"].read()))


class DeleteFailsOnce:
    """The store, as seen by a run that is interrupted (pod killed, database gone) after the archive was
    written and before the incidents were deleted."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def delete_archived(self, archived: Any) -> int:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the run was interrupted here")
        return int(await self._store.delete_archived(archived))


async def test_old_resolved_incidents_are_archived_to_s3_then_deleted(
    store: Any, cloud: AwsCloud, aws: Any, bucket: str
) -> None:
    """Resolved incidents whose last event is older than the retention end up as JSON objects in the
    bucket (the whole incident, timeline included) and are gone from the store; an old incident that is
    still open, and one resolved recently, stay and are not archived."""
    old = [await add_incident(store, opened_days_ago=120, resolved_days_ago=100) for _ in range(5)]
    still_open = await add_incident(store, opened_days_ago=200, resolved_days_ago=None)
    recent = await add_incident(store, opened_days_ago=120, resolved_days_ago=30)
    maintenance = Maintenance(
        store, processed_retention=None, batch_size=2, incident_retention=INCIDENT_RETENTION, cloud=cloud
    )

    report = await maintenance.run()

    assert (report.archived, report.deleted) == (5, 5)
    for incident in old:
        assert await store.get(incident.id) is None
        stored = await archived_object(aws, bucket, incident)
        assert stored is not None and stored["id"] == str(incident.id) and stored["status"] == "resolved"
        assert [e["kind"] for e in stored["timeline"]] == ["opened", "resolved"]
    for kept in (still_open, recent):
        assert await store.get(kept.id) is not None
        assert await archived_object(aws, bucket, kept) is None


async def test_an_interrupted_archive_run_is_completed_by_the_next_one(
    store: Any, cloud: AwsCloud, aws: Any, bucket: str
) -> None:
    """A run that dies after writing the archive and before deleting leaves the incident in the store
    and its object in S3; the next run writes the same object again and deletes the incident once."""
    incident = await add_incident(store, opened_days_ago=120, resolved_days_ago=100)
    interrupted = DeleteFailsOnce(store)
    first = Maintenance(
        interrupted, processed_retention=None, batch_size=10, incident_retention=INCIDENT_RETENTION,
        cloud=cloud,
    )  # fmt: skip
    with pytest.raises(ConnectionError):
        await first.run()
    assert await store.get(incident.id) is not None
    assert await archived_object(aws, bucket, incident) is not None

    report = await first.run()

    assert (report.archived, report.deleted) == (1, 1)
    assert await store.get(incident.id) is None
    stored = await archived_object(aws, bucket, incident)
    assert stored is not None and stored["id"] == str(incident.id)
    third = await first.run()
    assert (third.archived, third.deleted) == (0, 0)


async def test_an_incident_changed_after_it_was_archived_is_kept(
    store: Any, cloud: AwsCloud, aws: Any, bucket: str
) -> None:
    """If a handler changes an incident between the archive and the delete (a late note), the incident
    stays in the store rather than being deleted with a stale archive; a later run archives it anew."""
    incident = await add_incident(store, opened_days_ago=120, resolved_days_ago=100)
    (read,) = await store.resolved_before(NOW - INCIDENT_RETENTION, 10)
    async with store.transaction(uuid.uuid4().hex) as tx:
        changed = await tx.get(incident.id)
        changed.add_note(note="post-mortem linked", at=NOW - timedelta(days=99), actor="sre", message_id="n")
        await tx.update(changed)
    assert await store.delete_archived([read]) == 0
    assert await store.get(incident.id) is not None

    maintenance = Maintenance(
        store, processed_retention=None, batch_size=10, incident_retention=INCIDENT_RETENTION, cloud=cloud
    )
    assert (await maintenance.run()).deleted == 1
    stored = await archived_object(aws, bucket, incident)
    assert stored is not None and stored["timeline"][-1]["note"] == "post-mortem linked"


def test_archiving_needs_the_aws_adapter_and_a_bucket() -> None:
    """incident_archive_enabled without aws_enabled and a bucket stops at start-up, naming the setting,
    instead of deleting incidents it cannot archive."""
    with pytest.raises(SettingsError, match="INCIDENT_ARCHIVE_ENABLED"):
        load(incident_archive_enabled=True)
    with pytest.raises(SettingsError, match="aws_archive_bucket"):
        load(incident_archive_enabled=True, aws_enabled=True)
    enabled = load(incident_archive_enabled=True, aws_enabled=True, aws_archive_bucket="b")
    assert enabled.incident_archive_enabled


async def test_maintenance_runs_on_a_pool_of_one_connection() -> None:
    """With INCIDENTD_POSTGRES_POOL_MAX=1 a run does not wait for a second connection (the lock's own
    connection does the work): it finishes, and the store is usable afterwards."""
    postgres_available()
    from infra.postgres.store import PostgresStore

    schema = f"maintenance_test_{uuid.uuid4().hex[:12]}"
    store = await PostgresStore.open(PG_DSN, schema=schema, min_size=1, max_size=1)
    try:
        await seed(store, ["old"], NOW - timedelta(days=50))
        report = await asyncio.wait_for(
            Maintenance(store, processed_retention=RETENTION, batch_size=10).run(), timeout=30
        )
        assert report.pruned == 1 and not await processed(store, "old")
    finally:
        await store.close()
        await drop_schema(schema)


def test_the_maintenance_command_archives_or_says_in_one_line_why_not(
    tmp_path: Path, moto_url: str, aws_env: None, bucket: str
) -> None:
    """With archival on, `app.py maintenance` archives and deletes an old resolved incident; pointed at a
    bucket that does not exist it exits 1 with one line naming it and deletes nothing."""
    db = tmp_path / "incidentd.db"

    async def prepare() -> Incident:
        store = await SqliteStore.open(db)
        try:
            return await add_incident(store, opened_days_ago=120, resolved_days_ago=100)
        finally:
            await store.close()

    incident = asyncio.run(prepare())
    env = {"INCIDENTD_SQLITE_PATH": str(db), "INCIDENTD_INCIDENT_ARCHIVE_ENABLED": "true",
           "INCIDENTD_AWS_ENABLED": "true", "INCIDENTD_AWS_ENDPOINT_URL": moto_url}  # fmt: skip

    missing = CliRunner().invoke(cli, ["maintenance"], env=env | {"INCIDENTD_AWS_ARCHIVE_BUCKET": "no-such"})
    assert missing.exit_code == 1
    assert "Error:" in missing.output and "no-such" in missing.output and "Traceback" not in missing.output

    done = CliRunner().invoke(cli, ["maintenance"], env=env | {"INCIDENTD_AWS_ARCHIVE_BUCKET": bucket})
    assert done.exit_code == 0, done.output
    assert "archived 1 resolved incidents, deleted 1" in done.output

    async def gone() -> bool:
        store = await SqliteStore.open(db)
        try:
            return await store.get(incident.id) is None
        finally:
            await store.close()

    assert asyncio.run(gone())
