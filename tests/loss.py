"""The loss scenario both brokers' worker-process tests run: ``VALID`` incident.create commands and
``POISON`` invalid ones, published up front; the workers' SQLite store shows what they made of them."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from application.commands import CreateIncident
from application.messages import TYPE_ATTR
from application.ports import Broker

VALID, POISON = 5_000, 50
POISON_BODIES = [f'{{"title": "", "dedup_key": "poison-{i}"}}'.encode() for i in range(POISON)]
POISON_REASON = "title: String should have at least 1 character"


def published_bodies() -> list[bytes]:
    """The valid commands, then the poison ones."""
    bodies = [
        CreateIncident(title=f"disk full {i}", dedup_key=f"loss-{i}").model_dump_json().encode()
        for i in range(VALID)
    ]
    return bodies + POISON_BODIES


async def publish_all(broker: Broker, *, at_once: int = 200) -> None:
    """Publish :func:`published_bodies`, ``at_once`` publishes in flight at a time."""
    bodies = published_bodies()
    for start in range(0, len(bodies), at_once):
        batch = bodies[start : start + at_once]
        await asyncio.gather(*(broker.publisher.publish(b, {TYPE_ATTR: CreateIncident.TYPE}) for b in batch))


def incidents(db: Path) -> tuple[int, int]:
    """(incidents, distinct dedup keys) in the worker's store."""
    if not db.exists():
        return 0, 0
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return conn.execute("SELECT COUNT(*), COUNT(DISTINCT dedup_key) FROM incidents").fetchone()
        except sqlite3.OperationalError:  # schema not created yet, or busy
            return 0, 0
