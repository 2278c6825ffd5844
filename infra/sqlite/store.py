"""Incidents in SQLite, for the embedded default: no server, and incidents persist across runs.

SQLite has one writer at a time, so transactions are serialised by a lock (``BEGIN IMMEDIATE`` under an
asyncio lock); that is also what makes concurrent messages about the same incident safe here, so reads
take no lock of their own. The schema is versioned with ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

import aiosqlite

from application.errors import TransientError
from application.incidents import Incident, OpenGroup, Status
from application.ports import ChangedIncident, IncidentObserver, IncidentQuery, ServiceStats
from common.closing import closing
from common.redact import describe

if TYPE_CHECKING:
    from config.settings import Settings

# Index i holds the statements that bring the schema from version i to i + 1.
MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS incidents (
        id TEXT PRIMARY KEY,
        dedup_key TEXT NOT NULL,
        status TEXT NOT NULL,
        service TEXT NOT NULL,
        created_at TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS incidents_by_dedup_key ON incidents (dedup_key, created_at);
    CREATE INDEX IF NOT EXISTS incidents_by_status ON incidents (status, created_at);
    CREATE TABLE IF NOT EXISTS processed_messages (
        key TEXT PRIMARY KEY,
        processed_at TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE incidents ADD COLUMN environment TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN severity TEXT NOT NULL DEFAULT 'medium';
    ALTER TABLE incidents ADD COLUMN correlation_group TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN last_event_at TEXT NOT NULL DEFAULT '';
    UPDATE incidents SET last_event_at = created_at, correlation_group = id WHERE last_event_at = '';
    CREATE INDEX IF NOT EXISTS incidents_latest ON incidents (dedup_key);  -- rowid order within a key
    CREATE INDEX IF NOT EXISTS incidents_open_by_scope ON incidents (service, environment)
        WHERE status != 'resolved';
    """,
    # Retention (infra/maintenance.py): prune idempotency keys by age, find old resolved incidents.
    """
    CREATE INDEX IF NOT EXISTS processed_messages_by_time ON processed_messages (processed_at);
    CREATE INDEX IF NOT EXISTS incidents_resolved_by_last_event ON incidents (last_event_at)
        WHERE status = 'resolved';
    """,
    # The incident API's pages (infra/web/api.py): newest first by the instant, whatever the UTC offset
    # the timestamp was written with (a text sort would order "+02:00" wrongly), then by id.
    """
    CREATE INDEX IF NOT EXISTS incidents_page ON incidents (julianday(created_at) DESC, id DESC);
    """,
]


async def connect(path: Path | str) -> aiosqlite.Connection:
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(str(path), isolation_level=None)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA busy_timeout=5000")
    return db


async def migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = row[0] if row else 0
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        await db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")


_COLUMNS = (
    "id, dedup_key, status, service, environment, severity, correlation_group, created_at, last_event_at, doc"
)
_UPSERT = (
    f"INSERT INTO incidents ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET status = excluded.status, service = excluded.service, "
    "environment = excluded.environment, severity = excluded.severity, "
    "correlation_group = excluded.correlation_group, last_event_at = excluded.last_event_at, "
    "doc = excluded.doc"
)


def _row(incident: Incident) -> tuple[str, ...]:
    return (str(incident.id), incident.dedup_key, incident.status, incident.service, incident.environment,
            incident.severity, incident.correlation_group, incident.created_at.isoformat(),
            incident.last_event_at.isoformat(), incident.model_dump_json())  # fmt: skip


class _Transaction:
    def __init__(self, db: aiosqlite.Connection, already_processed: bool) -> None:
        self._db = db
        self.already_processed = already_processed
        self.changes: list[ChangedIncident] = []  # filled by the handler, read after the commit
        self.staged: dict[UUID, tuple[Incident, Status | None]] = {}
        self._loaded: dict[UUID, Status] = {}

    async def latest(self, dedup_keys: Collection[str]) -> dict[str, Incident]:
        """One query for all the keys (each call is a hop to aiosqlite's thread and back)."""
        sql = (
            "SELECT doc FROM incidents WHERE rowid IN (SELECT max(rowid) FROM incidents "
            "WHERE dedup_key IN (SELECT value FROM json_each(?)) GROUP BY dedup_key)"
        )
        async with self._db.execute(sql, (json.dumps(list(dedup_keys)),)) as cursor:
            rows = await cursor.fetchall()
        found = (self._loaded_incident(row[0]) for row in rows)
        return {incident.dedup_key: incident for incident in found}

    async def get(self, incident_id: UUID) -> Incident | None:
        return await self._one("SELECT doc FROM incidents WHERE id = ?", str(incident_id))

    async def open_groups(self, scopes: Collection[tuple[str, str]]) -> list[OpenGroup]:
        if not scopes:
            return []
        pairs = " OR ".join(["(service = ? AND environment = ?)"] * len(scopes))
        sql = (
            "SELECT correlation_group, service, environment, min(created_at), max(last_event_at) "
            f"FROM incidents WHERE status != 'resolved' AND ({pairs}) GROUP BY 1, 2, 3"
        )
        async with self._db.execute(sql, [value for scope in scopes for value in scope]) as cursor:
            rows = await cursor.fetchall()
        return [
            OpenGroup(r[0], r[1], r[2], datetime.fromisoformat(r[3]), datetime.fromisoformat(r[4]))
            for r in rows
        ]

    async def add(self, incident: Incident) -> None:
        self.staged[incident.id] = (incident, None)

    async def update(self, incident: Incident) -> None:
        previous = (
            self.staged[incident.id][1] if incident.id in self.staged else self._loaded.get(incident.id)
        )
        self.staged[incident.id] = (incident, previous)

    async def flush(self) -> None:
        """Write what the transaction changed, in the order it was first staged (one hop, not one each)."""
        if self.staged:
            await self._db.executemany(_UPSERT, [_row(incident) for incident, _ in self.staged.values()])

    async def _one(self, sql: str, *args: str) -> Incident | None:
        async with self._db.execute(sql, args) as cursor:
            row = await cursor.fetchone()
        return None if row is None else self._loaded_incident(row[0])

    def _loaded_incident(self, doc: str) -> Incident:
        incident = Incident.model_validate_json(doc)
        self._loaded.setdefault(incident.id, incident.status)
        return incident


# Busy or locked by another process, an I/O error, a full disk: waiting may help (not a bad statement).
_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_FULL")


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(getattr(exc, "sqlite_errorname", "")).startswith(
        _UNAVAILABLE
    )


class SqliteStore:
    def __init__(
        self,
        db: aiosqlite.Connection,
        observer: IncidentObserver | None = None,
        path: Path | str | None = None,
    ) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self._observer = observer
        # Readers (the API, the dashboard) use a connection of their own: on the writer's, a read could run
        # inside a worker's open transaction and see changes it may still roll back. WAL gives the second
        # connection the last committed state without waiting for the writer. (":memory:" has one.)
        self._path = None if path is None or str(path) == ":memory:" else path
        self._reader_db: aiosqlite.Connection | None = None
        self._reader_lock = asyncio.Lock()

    async def _reader(self) -> aiosqlite.Connection:
        if self._path is None:
            return self._db
        async with self._reader_lock:
            if self._reader_db is None:
                self._reader_db = await connect(self._path)
                await self._reader_db.execute("PRAGMA query_only = ON")
            return self._reader_db

    @classmethod
    async def open(cls, path: Path | str, observer: IncidentObserver | None = None) -> SqliteStore:
        db = await connect(path)
        try:
            await migrate(db)
        except BaseException:
            await db.close()  # its thread would keep the process alive
            raise
        return cls(db, observer, path)

    async def close(self) -> None:
        if self._reader_db is not None:
            await self._reader_db.close()
        await self._db.close()

    @asynccontextmanager
    async def transaction(
        self, idempotency_key: str, dedup_keys: Collection[str] = (), scopes: Collection[tuple[str, str]] = ()
    ) -> AsyncIterator[_Transaction]:
        """``dedup_keys`` and ``scopes`` are hints for stores with round trips to save; not used here."""
        async with self._lock:
            try:
                # Inside the try: a cancelled BEGIN (or COMMIT) still runs on aiosqlite's thread, and the
                # ROLLBACK queued after it must end it, or every later BEGIN fails on this connection.
                await self._db.execute("BEGIN IMMEDIATE")
                async with self._db.execute(
                    "SELECT 1 FROM processed_messages WHERE key = ?", (idempotency_key,)
                ) as cursor:
                    seen = await cursor.fetchone() is not None
                tx = _Transaction(self._db, seen)
                yield tx
                await tx.flush()
                if not seen:
                    await self._db.execute(
                        "INSERT INTO processed_messages (key, processed_at) VALUES (?, ?)",
                        (idempotency_key, datetime.now(UTC).isoformat()),
                    )
                await self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.OperationalError):  # none active: BEGIN failed or COMMIT ran
                    await self._db.execute("ROLLBACK")
                if _unavailable(exc):
                    raise TransientError(f"SQLite unavailable: {describe(exc)}") from exc
                raise
        if self._observer is not None:
            for incident, previous in tx.staged.values():
                self._observer.changed(incident, previous)

    async def get(self, incident_id: UUID) -> Incident | None:
        db = await self._reader()
        async with db.execute("SELECT doc FROM incidents WHERE id = ?", (str(incident_id),)) as cursor:
            row = await cursor.fetchone()
        return Incident.model_validate_json(row[0]) if row else None

    async def list(
        self, *, status: Status | None = None, service: str | None = None, limit: int = 1000
    ) -> list[Incident]:
        clauses: list[str] = []
        args: list[object] = []
        if status:
            clauses.append("status = ?")
            args.append(status)
        if service:
            clauses.append("service = ?")
            args.append(service)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT doc FROM incidents {where} ORDER BY created_at DESC, rowid DESC LIMIT ?"
        async with self._db.execute(sql, (*args, limit)) as cursor:
            rows = await cursor.fetchall()
        return [Incident.model_validate_json(r[0]) for r in rows]

    async def count(self, *, status: Status | None = None, service: str | None = None) -> int:
        sql = "SELECT count(*) FROM incidents WHERE (? IS NULL OR status = ?) AND (? IS NULL OR service = ?)"
        async with self._db.execute(sql, (status, status, service, service)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def search(self, query: IncidentQuery) -> builtins.list[Incident]:
        """A page of incidents for the API (application.ports.IncidentQuery), newest first."""
        clauses: list[str] = []
        args: list[object] = []
        if query.statuses:
            clauses.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            args.extend(query.statuses)
        for column in ("service", "environment", "severity", "correlation_group"):
            value = getattr(query, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if query.since is not None:
            clauses.append("julianday(created_at) >= julianday(?)")
            args.append(query.since.isoformat())
        if query.until is not None:
            clauses.append("julianday(created_at) < julianday(?)")
            args.append(query.until.isoformat())
        if query.title:
            clauses.append("json_extract(doc, '$.title') LIKE ? ESCAPE '\\'")
            args.append("%" + _like_escape(query.title) + "%")
        if query.after is not None:
            at, last_id = query.after[0].isoformat(), str(query.after[1])
            clauses.append(
                "(julianday(created_at) < julianday(?) OR (julianday(created_at) = julianday(?) AND id < ?))"
            )
            args.extend((at, at, last_id))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT doc FROM incidents {where} ORDER BY julianday(created_at) DESC, id DESC LIMIT ?"
        db = await self._reader()
        async with db.execute(sql, (*args, query.limit)) as cursor:
            rows = await cursor.fetchall()
        return [Incident.model_validate_json(r[0]) for r in rows]

    async def service_stats(self, since: datetime) -> builtins.list[ServiceStats]:
        sql = (
            "SELECT service, count(*), count(json_extract(doc, '$.acknowledged_at')), "
            "count(json_extract(doc, '$.resolved_at')), "
            "avg((julianday(json_extract(doc, '$.acknowledged_at')) - julianday(created_at)) * 86400.0), "
            "avg((julianday(json_extract(doc, '$.resolved_at')) - julianday(created_at)) * 86400.0) "
            "FROM incidents WHERE julianday(created_at) >= julianday(?) GROUP BY service ORDER BY service"
        )
        db = await self._reader()
        async with db.execute(sql, (since.isoformat(),)) as cursor:
            return [ServiceStats(*row) for row in await cursor.fetchall()]

    async def count_active(self) -> dict[tuple[str, str], int]:
        sql = "SELECT severity, service, count(*) FROM incidents WHERE status != 'resolved' GROUP BY 1, 2"
        async with self._db.execute(sql) as cursor:
            return {(r[0], r[1]): r[2] for r in await cursor.fetchall()}

    async def ping(self) -> None:
        await self._db.execute("SELECT 1")

    # --- maintenance (infra/maintenance.py) ------------------------------------------------------------
    # Each statement runs under the store's lock: the connection is shared with handlers' transactions,
    # and a statement sent while one is open would become part of it.

    @asynccontextmanager
    async def maintenance_lock(self) -> AsyncIterator[bool]:
        """Always granted: SQLite's own write lock serialises two processes' batches, which are each
        atomic, so running maintenance twice at once is harmless."""
        yield True

    async def prune_processed(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` (at most :data:`PRUNE_BATCH_MAX`) idempotency keys recorded before
        ``before``, in one transaction."""
        limit = min(limit, PRUNE_BATCH_MAX)
        sql = (
            "DELETE FROM processed_messages WHERE rowid IN (SELECT rowid FROM processed_messages "
            "WHERE processed_at < ? ORDER BY processed_at LIMIT ?)"
        )
        async with self._lock, self._db.execute(sql, (_utc(before), limit)) as cursor:
            return cursor.rowcount

    async def resolved_before(self, before: datetime, limit: int) -> Sequence[tuple[Incident, str]]:
        """Up to ``limit`` resolved incidents whose last event is older than ``before``, oldest first,
        each with its stored document (what :meth:`delete_archived` compares against)."""
        sql = (
            "SELECT doc FROM incidents WHERE status = 'resolved' AND last_event_at < ? "
            "ORDER BY last_event_at LIMIT ?"
        )
        async with self._lock, self._db.execute(sql, (_utc(before), limit)) as cursor:
            rows = await cursor.fetchall()
        return [(Incident.model_validate_json(row[0]), row[0]) for row in rows]

    async def delete_archived(self, archived: Sequence[tuple[Incident, str]]) -> int:
        """Delete these incidents, each only if unchanged since it was read."""
        sql = "DELETE FROM incidents WHERE id = ? AND status = 'resolved' AND doc = ?"
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                deleted = 0
                for incident, doc in archived:
                    async with self._db.execute(sql, (str(incident.id), doc)) as cursor:
                        deleted += cursor.rowcount
                await self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.OperationalError):
                    await self._db.execute("ROLLBACK")
                raise
        return deleted


# Deleting keys costs SQLite about 0.1 ms a row (each touches a random page of the key index, written to
# the WAL at commit; tests/bench/maintenance_bench.py), and handlers wait for the one writer meanwhile:
# 1,000 rows hold it about 0.1 s, 5,000 about 0.5 s.
PRUNE_BATCH_MAX = 1000


def _utc(at: datetime) -> str:
    """The text form timestamps are stored in (UTC ISO 8601), so that text comparison orders them."""
    return at.astimezone(UTC).isoformat()


def _like_escape(text: str) -> str:
    """``text`` for a LIKE pattern with ESCAPE '\\': its % and _ match themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@asynccontextmanager
async def open_store(
    settings: Settings, observer: IncidentObserver | None = None
) -> AsyncIterator[SqliteStore]:
    """The store at ``sqlite_path``, migrated; closed on exit (an open connection's thread would keep the
    process alive)."""
    store = await SqliteStore.open(settings.sqlite_path, observer)
    async with closing(store):
        yield store
