"""Versioned SQL migrations: ``migrations/NNNN_name.sql``, applied in order, each once.

Applied at start-up by every worker. A session advisory lock makes two pods starting at once safe: the
second waits, then finds the versions already in ``schema_migrations`` and applies nothing. Each file
runs in its own transaction with the row that records it, so a failed migration leaves no half schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_NAMESPACE = 0x1DD  # the first key of incidentd's two-key advisory locks (the second is a hash)


async def migrate(conn: Any, schema: str = "", directory: Path = MIGRATIONS) -> list[str]:
    """Bring the schema up to date; return the versions applied now (empty when it already was)."""
    lock = "SELECT pg_advisory_lock($1, hashtext('migrations:' || $2))"
    await conn.execute(lock, _LOCK_NAMESPACE, schema)
    try:
        if schema:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in _pending(directory, done):
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
        return applied
    finally:
        await conn.execute(
            "SELECT pg_advisory_unlock($1, hashtext('migrations:' || $2))", _LOCK_NAMESPACE, schema
        )


def _pending(directory: Path, done: set[str]) -> list[tuple[str, str]]:
    """(version, SQL) of each file not applied yet, in file-name order (a few small local files)."""
    return [(p.stem, p.read_text()) for p in sorted(directory.glob("*.sql")) if p.stem not in done]
