"""Incidents in PostgreSQL through an asyncpg pool.

Effectively-once: the transaction *starts* by inserting the message's idempotency key
(``INSERT ... ON CONFLICT DO NOTHING``). A redelivered copy finds the key and changes nothing; a copy
delivered concurrently blocks on the first one's uncommitted key and then finds it (or, if the first
rolled back, takes over). The handler's changes are written in the same transaction, so a worker killed
between commit and ack leaves the key behind and the redelivery is a no-op.

Serialisation: before reading an incident a transaction takes ``pg_advisory_xact_lock`` on its dedup
key (hashed) - a row lock cannot cover a key that has no incident yet, and two concurrent firings of a
new fingerprint must not open two incidents. Locks are taken in hash order in one statement, so
transactions never deadlock; a unique partial index (one unresolved incident per dedup key) is the
safety net. Writes are buffered and sent at commit in one statement.

Round trips: a handler that names its dedup keys and correlation scopes when it opens the transaction
(``transaction(key, dedup_keys, scopes)``) has the idempotency insert, the locks and the reads done by one
function call (``incidentd_begin``, migration 0003), so a message costs BEGIN, that call, the write and
COMMIT. Connections go back to the pool without asyncpg's reset query (see :func:`_keep_session`).
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from application.errors import TransientError
from application.incidents import Incident, OpenGroup, Status
from application.ports import ChangedIncident, IncidentObserver, IncidentQuery, ServiceStats
from common.closing import closing
from common.redact import describe
from infra.postgres.migrate import _LOCK_NAMESPACE, migrate

if TYPE_CHECKING:
    from config.settings import Settings

_LOCK = (
    "SELECT pg_advisory_xact_lock($2, h) FROM "
    "(SELECT DISTINCT hashtext(k) AS h FROM unnest($1::text[]) AS k ORDER BY 1) AS ordered"
)
# Lock, then read under the locks: functions of migration 0002 (one round trip each).
_BEGIN = "SELECT * FROM incidentd_begin($1, $2::text[], $3::text[], $4::text[], $5::text[], $6)"
_PROCESSED = "INSERT INTO processed_messages (key) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true"
_LATEST = "SELECT incidentd_latest($1::text[], $2)"
_OPEN_GROUPS = "SELECT * FROM incidentd_open_groups($1::text[], $2, $3::text[], $4::text[])"
# Every staged incident in one statement, in staging order (so ``seq`` orders a successor after the
# incident it follows, as separate inserts would).
_UPSERT = """
INSERT INTO incidents (id, dedup_key, status, severity, service, environment, correlation_group,
                       created_at, last_event_at, doc)
SELECT id, dedup_key, status, severity, service, environment, correlation_group, created_at, last_event_at,
       doc::json
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::timestamptz[], $9::timestamptz[], $10::text[]) WITH ORDINALITY
     AS r(id, dedup_key, status, severity, service, environment, correlation_group, created_at,
          last_event_at, doc, n)
ORDER BY n
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, severity = EXCLUDED.severity,
    service = EXCLUDED.service, environment = EXCLUDED.environment,
    correlation_group = EXCLUDED.correlation_group, last_event_at = EXCLUDED.last_event_at, doc = EXCLUDED.doc
"""


# --- maintenance (infra/maintenance.py): retention and archival, in short transactions -----------------
# One session lock per schema: the pod (or CronJob run) that holds it does the maintenance, others skip.
_MAINTENANCE_LOCK = "hashtext('maintenance:' || current_schema())"
# A batch of the oldest keys by the processed_at index, deleted by row address (no second index lookup);
# rows of processed_messages are never updated, so an address read in the same statement stays valid.
_PRUNE_PROCESSED = """
DELETE FROM processed_messages WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM processed_messages WHERE processed_at < $1 ORDER BY processed_at LIMIT $2))
"""
# resolved_last_event_at: last_event_at of a resolved incident, NULL while it is open (migration 0007).
_RESOLVED_BEFORE = """
SELECT id, dedup_key, created_at, doc::text FROM incidents
WHERE resolved_last_event_at < $1 ORDER BY resolved_last_event_at, seq LIMIT $2
"""
# Deletes an archived incident only if it is still exactly what was archived (``json`` keeps the text
# as written); one changed since is kept, and archived again on the next run.
_DELETE_ARCHIVED = """
DELETE FROM incidents AS i USING unnest($1::uuid[], $2::text[]) AS a(id, doc)
WHERE i.id = a.id AND i.status = 'resolved' AND i.doc::text = a.doc
"""


# The server is down, restarting, out of connections, or the network path is gone: retrying helps.
_UNAVAILABLE = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)  # fmt: skip


@contextmanager
def _transient_when_unavailable() -> Iterator[None]:
    """A lost or refused connection is a :class:`TransientError`: the dispatcher retries it in-process,
    then redelivers, without a traceback per message."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise TransientError(f"PostgreSQL unavailable: {describe(exc)}") from exc


def _row(i: Incident) -> tuple[Any, ...]:
    return (i.id, i.dedup_key, i.status, i.severity, i.service, i.environment, i.correlation_group,
            i.created_at, i.last_event_at, i.model_dump_json())  # fmt: skip


def _scope_key(scope: tuple[str, str]) -> str:
    return f"correlation:{scope[0]}/{scope[1]}"


async def _keep_session(conn: Any) -> None:
    """The pool's reset: nothing beyond asyncpg's own (it rolls back an unfinished transaction first).

    asyncpg's default sends ``RESET ALL; CLOSE ALL; UNLISTEN *; pg_advisory_unlock_all()`` on every
    release - a round trip per message for state this store never leaves in a session: its settings
    are connection parameters (search_path), its locks are transaction locks, and it opens no cursors
    and listens to nothing (the migrations' session lock is taken on a connection of their own).
    """


class _Transaction:
    def __init__(self, conn: Any, already_processed: bool) -> None:
        self._conn = conn
        self.already_processed = already_processed
        self.changes: list[ChangedIncident] = []  # filled by the handler, read after the commit
        self._locked: set[str] = set()
        self._loaded: dict[UUID, Status] = {}
        self.staged: dict[UUID, tuple[Incident, Status | None]] = {}
        # What incidentd_begin already locked and read, served by the first latest() / open_groups().
        self._prefetched: dict[str, Incident | None] = {}
        self._prefetched_groups: dict[tuple[str, str], list[OpenGroup]] | None = None

    @classmethod
    async def begin(
        cls, conn: Any, idempotency_key: str, dedup_keys: Collection[str], scopes: Collection[tuple[str, str]]
    ) -> _Transaction:
        """Record the key; when the handler named its keys, lock and read them in the same round trip."""
        if not dedup_keys:
            first = await conn.fetchval(_PROCESSED, idempotency_key)
            return cls(conn, already_processed=first is None)
        keys, wanted = sorted(set(dedup_keys)), sorted(set(scopes))
        services, environments = [s for s, _ in wanted], [e for _, e in wanted]
        scope_keys = [_scope_key(scope) for scope in wanted]
        rows = await conn.fetch(_BEGIN, idempotency_key, keys, scope_keys, services, environments,
                                _LOCK_NAMESPACE)  # fmt: skip
        if rows and rows[0][0] == "processed":
            return cls(conn, already_processed=True)
        tx = cls(conn, already_processed=False)
        tx._locked.update(keys)
        tx._prefetched = dict.fromkeys(keys)
        groups: dict[tuple[str, str], list[OpenGroup]] = {scope: [] for scope in wanted}
        for kind, doc, *group in rows:
            if kind == "incident":
                incident = tx._loaded_incident(doc)
                tx._prefetched[incident.dedup_key] = incident
            elif kind == "group":
                groups[group[1], group[2]].append(OpenGroup(*group))
            elif kind == "scopes":
                tx._locked.update(scope_keys)
                tx._prefetched_groups = groups
        return tx

    async def _lock(self, keys: Iterable[str]) -> None:
        """Lock keys this transaction does not hold yet, in the one order (``_LOCK`` sorts by hash)."""
        new = sorted(set(keys) - self._locked)
        if new:
            await self._conn.execute(_LOCK, new, _LOCK_NAMESPACE)
            self._locked.update(new)

    async def latest(self, dedup_keys: Collection[str]) -> dict[str, Incident]:
        found: dict[str, Incident] = {}
        keys = []
        for key in dedup_keys:
            if key not in self._prefetched:
                keys.append(key)
            elif (prefetched := self._prefetched.pop(key)) is not None:
                found[key] = prefetched
        if not keys:
            return found
        self._locked.update(keys)
        for record in await self._conn.fetch(_LATEST, keys, _LOCK_NAMESPACE):
            incident = self._loaded_incident(record[0])
            found[incident.dedup_key] = incident
        return found

    async def get(self, incident_id: UUID) -> Incident | None:
        key = await self._conn.fetchval("SELECT dedup_key FROM incidents WHERE id = $1", incident_id)
        if key is None:
            return None
        await self._lock([key])
        doc = await self._conn.fetchval("SELECT doc::text FROM incidents WHERE id = $1", incident_id)
        return self._loaded_incident(doc)

    async def open_groups(self, scopes: Collection[tuple[str, str]]) -> list[OpenGroup]:
        prefetched, self._prefetched_groups = self._prefetched_groups, None
        if prefetched is not None and all(scope in prefetched for scope in scopes):
            return [group for scope in scopes for group in prefetched[scope]]
        keys = [_scope_key(scope) for scope in scopes]
        self._locked.update(keys)
        services, environments = zip(*scopes, strict=True) if scopes else ((), ())
        rows = await self._conn.fetch(_OPEN_GROUPS, keys, _LOCK_NAMESPACE, list(services), list(environments))
        return [OpenGroup(*row) for row in rows]

    async def add(self, incident: Incident) -> None:
        self.staged[incident.id] = (incident, None)

    async def update(self, incident: Incident) -> None:
        previous = (
            self.staged[incident.id][1] if incident.id in self.staged else self._loaded.get(incident.id)
        )
        self.staged[incident.id] = (incident, previous)

    async def flush(self) -> None:
        if self.staged:
            columns = zip(*(_row(incident) for incident, _ in self.staged.values()), strict=True)
            await self._conn.execute(_UPSERT, *(list(column) for column in columns))

    def _loaded_incident(self, doc: str) -> Incident:
        incident = Incident.model_validate_json(doc)
        self._loaded.setdefault(incident.id, incident.status)
        return incident


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, observer: IncidentObserver | None = None) -> None:
        self._pool = pool
        self._observer = observer
        self._maintenance_conn: Any = None  # see maintenance_lock

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 2, max_size: int = 10, schema: str = "",
        observer: IncidentObserver | None = None,
    ) -> PostgresStore:  # fmt: skip
        """Create the pool and apply pending migrations; ``schema``, when set, is the search_path."""
        settings = {"search_path": schema} if schema else None
        conn = await asyncpg.connect(dsn, server_settings=settings)
        try:
            await migrate(conn, schema)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, server_settings=settings, reset=_keep_session
        )
        return cls(pool, observer)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def transaction(
        self, idempotency_key: str, dedup_keys: Collection[str] = (), scopes: Collection[tuple[str, str]] = ()
    ) -> AsyncIterator[_Transaction]:
        with _transient_when_unavailable():
            async with self._pool.acquire() as conn, conn.transaction():
                tx = await _Transaction.begin(conn, idempotency_key, dedup_keys, scopes)
                yield tx
                await tx.flush()
        if self._observer is not None:
            for incident, previous in tx.staged.values():
                self._observer.changed(incident, previous)

    async def get(self, incident_id: UUID) -> Incident | None:
        doc = await self._pool.fetchval("SELECT doc::text FROM incidents WHERE id = $1", incident_id)
        return Incident.model_validate_json(doc) if doc else None

    async def list(
        self, *, status: Status | None = None, service: str | None = None, limit: int = 1000
    ) -> list[Incident]:
        sql = (
            "SELECT doc::text FROM incidents WHERE ($1::text IS NULL OR status = $1) "
            "AND ($2::text IS NULL OR service = $2) ORDER BY created_at DESC, seq DESC LIMIT $3"
        )
        rows = await self._pool.fetch(sql, status, service, limit)
        return [Incident.model_validate_json(r[0]) for r in rows]

    async def count(self, *, status: Status | None = None, service: str | None = None) -> int:
        sql = (
            "SELECT count(*) FROM incidents WHERE ($1::text IS NULL OR status = $1) "
            "AND ($2::text IS NULL OR service = $2)"
        )
        return int(await self._pool.fetchval(sql, status, service))

    async def search(self, query: IncidentQuery) -> builtins.list[Incident]:
        """A page of incidents for the API (application.ports.IncidentQuery), newest first. Only the
        filters given become clauses (no ``$n IS NULL OR ...``, which would leave the planner a generic
        plan); the indexes of migration 0006 serve the order and the common filters."""
        clauses: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.statuses:
            clauses.append(f"status = ANY({arg(list(query.statuses))}::text[])")
        for column in ("service", "environment", "severity", "correlation_group"):
            value = getattr(query, column)
            if value is not None:
                clauses.append(f"{column} = {arg(value)}")
        if query.since is not None:
            clauses.append(f"created_at >= {arg(query.since)}")
        if query.until is not None:
            clauses.append(f"created_at < {arg(query.until)}")
        if query.title:
            escaped = query.title.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append(f"title ILIKE {arg('%' + escaped + '%')}")
        if query.after is not None:
            clauses.append(f"(created_at, id) < ({arg(query.after[0])}, {arg(query.after[1])}::uuid)")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = f"ORDER BY created_at DESC, id DESC LIMIT {arg(query.limit)}"
        sql = f"SELECT doc::text FROM incidents {where} {order}"
        rows = await self._pool.fetch(sql, *args)
        return [Incident.model_validate_json(r[0]) for r in rows]

    async def service_stats(self, since: datetime) -> builtins.list[ServiceStats]:
        sql = """
            SELECT service, count(*), count(doc->>'acknowledged_at'), count(doc->>'resolved_at'),
                   avg(extract(epoch FROM (doc->>'acknowledged_at')::timestamptz - created_at))::float8,
                   avg(extract(epoch FROM (doc->>'resolved_at')::timestamptz - created_at))::float8
            FROM incidents WHERE created_at >= $1 GROUP BY service ORDER BY service
        """
        return [ServiceStats(*row) for row in await self._pool.fetch(sql, since)]

    async def count_active(self) -> dict[tuple[str, str], int]:
        sql = "SELECT severity, service, count(*) FROM incidents WHERE status <> 'resolved' GROUP BY 1, 2"
        return {(r[0], r[1]): r[2] for r in await self._pool.fetch(sql)}

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")

    # --- maintenance (infra/maintenance.py) ------------------------------------------------------------

    @asynccontextmanager
    async def maintenance_lock(self) -> AsyncIterator[bool]:
        """True while this process holds the schema's maintenance lock; False (at once) when another
        does. A session lock on a connection kept for the duration (the server frees it if that dies);
        the maintenance statements run on that connection meanwhile, so a run needs one pool
        connection, not two (with ``postgres_pool_max`` 1 it would otherwise wait for itself)."""
        async with self._pool.acquire() as conn:
            held = await conn.fetchval(
                f"SELECT pg_try_advisory_lock($1, {_MAINTENANCE_LOCK})", _LOCK_NAMESPACE
            )
            self._maintenance_conn = conn if held else None
            try:
                yield bool(held)
            finally:
                self._maintenance_conn = None
                if held:
                    await conn.fetchval(
                        f"SELECT pg_advisory_unlock($1, {_MAINTENANCE_LOCK})", _LOCK_NAMESPACE
                    )

    @asynccontextmanager
    async def _maintenance_connection(self) -> AsyncIterator[Any]:
        """The maintenance lock's connection while it is held, else one from the pool."""
        if self._maintenance_conn is not None:
            yield self._maintenance_conn
            return
        async with self._pool.acquire() as conn:
            yield conn

    async def prune_processed(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` idempotency keys recorded before ``before`` (one short transaction)."""
        async with self._maintenance_connection() as conn:
            status = await conn.execute(_PRUNE_PROCESSED, before, limit)
        return int(status.split()[-1])

    async def resolved_before(self, before: datetime, limit: int) -> Sequence[tuple[Incident, str]]:
        """Up to ``limit`` resolved incidents whose last event is older than ``before``, oldest first,
        each with its stored document (what :meth:`delete_archived` compares against)."""
        async with self._maintenance_connection() as conn:
            rows = await conn.fetch(_RESOLVED_BEFORE, before, limit)
        return [(Incident.model_validate_json(row[3]), row[3]) for row in rows]

    async def delete_archived(self, archived: Sequence[tuple[Incident, str]]) -> int:
        """Delete these incidents, each only if unchanged since it was read; their dedup keys are locked
        first (as a handler's transaction does), so no handler is half-way through one of them."""
        if not archived:
            return 0
        async with self._maintenance_connection() as conn, conn.transaction():
            await conn.execute(_LOCK, sorted({i.dedup_key for i, _ in archived}), _LOCK_NAMESPACE)
            status = await conn.execute(
                _DELETE_ARCHIVED, [i.id for i, _ in archived], [doc for _, doc in archived]
            )
        return int(status.split()[-1])


@asynccontextmanager
async def open_store(
    settings: Settings, observer: IncidentObserver | None = None
) -> AsyncIterator[PostgresStore]:
    """The pool on ``postgres_dsn``, the schema migrated; closed on exit."""
    store = await PostgresStore.open(
        settings.postgres_dsn, min_size=settings.postgres_pool_min, max_size=settings.postgres_pool_max,
        schema=settings.postgres_schema, observer=observer,
    )  # fmt: skip
    async with closing(store):
        yield store
