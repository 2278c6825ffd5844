"""Incidents in SQLite, for the embedded default: no server, and incidents persist across runs.

SQLite has one writer at a time, so transactions are serialised by a lock; that is also what makes
concurrent messages about the same incident safe here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import aiosqlite

from application.incidents import Incident, Status

SCHEMA = """
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
"""


async def connect(path: Path | str) -> aiosqlite.Connection:
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(str(path), isolation_level=None)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA busy_timeout=5000")
    return db


class _Transaction:
    def __init__(self, db: aiosqlite.Connection, already_processed: bool) -> None:
        self._db = db
        self.already_processed = already_processed

    async def get(self, incident_id: UUID) -> Incident | None:
        return await self._one("SELECT doc FROM incidents WHERE id = ?", str(incident_id))

    async def find_open(self, dedup_key: str) -> Incident | None:
        return await self._one(
            "SELECT doc FROM incidents WHERE dedup_key = ? AND status != 'resolved' "
            "ORDER BY created_at DESC LIMIT 1",
            dedup_key,
        )

    async def find_latest(self, dedup_key: str) -> Incident | None:
        return await self._one(
            "SELECT doc FROM incidents WHERE dedup_key = ? ORDER BY created_at DESC LIMIT 1", dedup_key
        )

    async def add(self, incident: Incident) -> None:
        await self._db.execute(
            "INSERT INTO incidents (id, dedup_key, status, service, created_at, doc)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                str(incident.id),
                incident.dedup_key,
                incident.status,
                incident.service,
                incident.created_at.isoformat(),
                incident.model_dump_json(),
            ),
        )

    async def update(self, incident: Incident) -> None:
        await self._db.execute(
            "UPDATE incidents SET status = ?, service = ?, doc = ? WHERE id = ?",
            (incident.status, incident.service, incident.model_dump_json(), str(incident.id)),
        )

    async def _one(self, sql: str, *args: str) -> Incident | None:
        async with self._db.execute(sql, args) as cursor:
            row = await cursor.fetchone()
        return Incident.model_validate_json(row[0]) if row else None


class SqliteStore:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str) -> SqliteStore:
        db = await connect(path)
        await db.executescript(SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    @asynccontextmanager
    async def transaction(self, idempotency_key: str) -> AsyncIterator[_Transaction]:
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                async with self._db.execute(
                    "SELECT 1 FROM processed_messages WHERE key = ?", (idempotency_key,)
                ) as cursor:
                    seen = await cursor.fetchone() is not None
                yield _Transaction(self._db, seen)
                if not seen:
                    await self._db.execute(
                        "INSERT INTO processed_messages (key, processed_at) VALUES (?, ?)",
                        (idempotency_key, datetime.now(UTC).isoformat()),
                    )
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def get(self, incident_id: UUID) -> Incident | None:
        async with self._db.execute("SELECT doc FROM incidents WHERE id = ?", (str(incident_id),)) as cursor:
            row = await cursor.fetchone()
        return Incident.model_validate_json(row[0]) if row else None

    async def list(
        self, *, status: Status | None = None, service: str | None = None, limit: int = 1000
    ) -> list[Incident]:
        clauses, args = [], []
        if status:
            clauses.append("status = ?")
            args.append(status)
        if service:
            clauses.append("service = ?")
            args.append(service)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT doc FROM incidents {where} ORDER BY created_at DESC LIMIT ?"
        async with self._db.execute(sql, (*args, limit)) as cursor:
            rows = await cursor.fetchall()
        return [Incident.model_validate_json(r[0]) for r in rows]

    async def ping(self) -> None:
        await self._db.execute("SELECT 1")
