"""The memory broker's dead-letter destination, kept in SQLite so ``dlq list`` sees it after the run
(the queue itself lives in the process)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from application.errors import BrokerOperationError
from application.messages import Message
from application.ports import DeadLetter, ReplayReport
from infra.sqlite.store import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    attributes TEXT NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_seen TEXT,
    dead_lettered_at TEXT NOT NULL
);
"""


class MemoryDeadLetters:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path | str) -> MemoryDeadLetters:
        db = await connect(path)
        await db.executescript(SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def add(self, letter: DeadLetter) -> None:
        await self._db.execute(
            "INSERT INTO dead_letters (message_id, body, attributes, reason, error, attempts, first_seen,"
            " dead_lettered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                letter.message_id,
                letter.body,
                json.dumps(dict(letter.attributes)),
                letter.reason,
                letter.error,
                letter.attempts,
                letter.first_seen.isoformat() if letter.first_seen else None,
                (letter.dead_lettered_at or datetime.now(UTC)).isoformat(),
            ),
        )

    async def list(self, *, limit: int | None = None) -> list[DeadLetter]:
        """One entry per original message (its oldest copy, with the number of copies), oldest first."""
        sql = "SELECT message_id, body, attributes, reason, error, attempts, first_seen, dead_lettered_at,"
        sql += " copies FROM (SELECT *, count(*) OVER (PARTITION BY message_id) AS copies,"
        sql += " row_number() OVER (PARTITION BY message_id ORDER BY seq) AS nth FROM dead_letters)"
        sql += " WHERE nth = 1 OR message_id = '' ORDER BY seq LIMIT ?"
        async with self._db.execute(sql, (-1 if limit is None else limit,)) as cursor:
            rows = await cursor.fetchall()
        return [
            DeadLetter(
                message_id=r[0],
                body=bytes(r[1]),
                attributes=json.loads(r[2]),
                reason=r[3],
                error=r[4],
                attempts=r[5],
                first_seen=datetime.fromisoformat(r[6]) if r[6] else None,
                dead_lettered_at=datetime.fromisoformat(r[7]),
                copies=r[8] if r[0] else 1,
            )
            for r in rows
        ]

    async def replay(
        self, *, validate: Callable[[Message], object], limit: int | None = None, dry_run: bool = False
    ) -> ReplayReport:
        # The memory broker's queue lives inside one worker process; replaying into it from the CLI
        # would drop the messages when the CLI exits. Say so instead of losing them.
        raise BrokerOperationError(
            "the memory broker cannot replay dead letters from the CLI (its queue lives in the worker "
            "process); use 'dlq list --json' and feed the bodies to 'worker --from', or use RabbitMQ/Pub/Sub"
        )

    async def purge(self, *, limit: int | None = None, dry_run: bool = False) -> int:
        sql = "SELECT seq FROM dead_letters ORDER BY seq LIMIT ?"
        async with self._db.execute(sql, (-1 if limit is None else limit,)) as cursor:
            seqs = [row[0] for row in await cursor.fetchall()]
        if seqs and not dry_run:
            await self._db.execute(
                f"DELETE FROM dead_letters WHERE seq IN ({','.join('?' * len(seqs))})", seqs
            )
        return len(seqs)
