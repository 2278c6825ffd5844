"""Keeping the store bounded over months: retention of idempotency keys, archival of old incidents.

One run (:meth:`Maintenance.run`), by ``python app.py maintenance`` (the CronJob in deploy/) or every
``maintenance_interval`` seconds inside the worker (:func:`run_periodically`):

1. ``processed_messages``: keys older than ``processed_messages_retention_days`` are deleted in batches
   of ``maintenance_batch_size`` rows, each batch its own short transaction, so handlers inserting keys
   meanwhile never wait long on it. A key must outlive every copy of its message a broker can still
   hand back (see docs/operations.md#retention for the reasoning behind the 45-day default).
2. With ``incident_archive_enabled``: resolved incidents whose last event is older than
   ``incident_retention_days`` are written to S3 (``incidents/<yyyy>/<mm>/<dd>/<id>.json``, the date
   being the incident's creation) and only then deleted, and only if unchanged since they were read.
   The object key depends only on the incident, so a run interrupted between the two steps is repaired
   by the next: it writes the same object again and deletes once.

Only one process runs it at a time per store (PostgreSQL: a session advisory lock; a process that does
not get it skips the run).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import orjson
import structlog

from application.incidents import Incident
from application.ports import Cloud

if TYPE_CHECKING:
    from config.settings import Settings

log = structlog.get_logger("incidentd.maintenance")


class MaintainedStore(Protocol):
    """What maintenance needs from an incident store (both stores implement it)."""

    def maintenance_lock(self) -> AbstractAsyncContextManager[bool]: ...

    async def prune_processed(self, before: datetime, limit: int) -> int: ...

    async def resolved_before(self, before: datetime, limit: int) -> Sequence[tuple[Incident, str]]: ...

    async def delete_archived(self, archived: Sequence[tuple[Incident, str]]) -> int: ...


@dataclass
class Report:
    """What one run did; ``locked_out`` when another process held the lock (nothing was done)."""

    pruned: int = 0
    prune_seconds: float = 0.0
    archived: int = 0
    deleted: int = 0
    locked_out: bool = False
    archiving: bool = False

    def summary(self) -> str:
        if self.locked_out:
            return "maintenance: another process is running it; nothing done"
        rate = f" ({self.pruned / self.prune_seconds:,.0f}/s)" if self.pruned and self.prune_seconds else ""
        archive = (
            f"archived {self.archived:,} resolved incidents, deleted {self.deleted:,}"
            if self.archiving
            else "incident archival is off"
        )
        return f"pruned {self.pruned:,} processed-message keys{rate}; {archive}"


class Maintenance:
    def __init__(
        self,
        store: MaintainedStore,
        *,
        processed_retention: timedelta | None,
        batch_size: int,
        incident_retention: timedelta | None = None,
        cloud: Cloud | None = None,
    ) -> None:
        """``processed_retention`` None: keep keys for ever; ``incident_retention`` None: no archival
        (it needs ``cloud``, whose S3 bucket receives the archive)."""
        if incident_retention is not None and cloud is None:
            raise ValueError("archiving incidents needs the AWS adapter (aws_enabled)")
        self._store = store
        self._processed_retention = processed_retention
        self._batch = batch_size
        self._incident_retention = incident_retention
        self._cloud = cloud

    async def run(self, now: datetime | None = None) -> Report:
        now = now or datetime.now(UTC)
        report = Report(archiving=self._incident_retention is not None)
        async with self._store.maintenance_lock() as held:
            if not held:
                report.locked_out = True
                return report
            if self._processed_retention is not None:
                await self._prune(now - self._processed_retention, report)
            if self._incident_retention is not None:
                await self._archive(now - self._incident_retention, report)
        log.info("maintenance.done", pruned=report.pruned, archived=report.archived, deleted=report.deleted,
                 prune_seconds=round(report.prune_seconds, 3))  # fmt: skip
        return report

    async def _prune(self, before: datetime, report: Report) -> None:
        started = time.perf_counter()
        while True:
            deleted = await self._store.prune_processed(before, self._batch)
            report.pruned += deleted
            if not deleted:  # not "fewer than asked": a store may cap its batches (SQLite)
                break
            await asyncio.sleep(0)  # let the worker's own tasks run between batches
        report.prune_seconds = time.perf_counter() - started

    async def _archive(self, before: datetime, report: Report) -> None:
        assert self._cloud is not None
        while True:
            batch = await self._store.resolved_before(before, self._batch)
            for incident, doc in batch:
                await self._cloud.archive(orjson.loads(doc), id=str(incident.id), at=incident.created_at)
            report.archived += len(batch)
            deleted = await self._store.delete_archived(batch)
            report.deleted += deleted
            # Fewer deleted than read: some changed meanwhile and stay; stop rather than read them again.
            if len(batch) < self._batch or deleted < len(batch):
                break


def days(value: float) -> timedelta | None:
    """A retention setting in days as a timedelta; 0 means none (keep for ever)."""
    return timedelta(days=value) if value > 0 else None


async def run_periodically(maintenance: Maintenance, interval: float) -> None:
    """The worker's loop: a run every ``interval`` seconds (the first one ``interval`` after start, so
    that a crash-looping pod does not prune on every start); a failed run is logged and retried at the
    next interval."""
    while True:
        await asyncio.sleep(interval)
        try:
            await maintenance.run()
        except Exception as exc:
            log.warning("maintenance.failed", error=f"{type(exc).__name__}: {exc}")


def from_settings(settings: Settings, store: MaintainedStore, cloud: Cloud | None) -> Maintenance:
    """Retention from the ``*_retention_days`` settings; archival only with ``incident_archive_enabled``."""
    return Maintenance(
        store,
        processed_retention=days(settings.processed_messages_retention_days),
        batch_size=settings.maintenance_batch_size,
        incident_retention=(
            days(settings.incident_retention_days) if settings.incident_archive_enabled else None
        ),
        cloud=cloud,
    )


@asynccontextmanager
async def open_loop(settings: Settings, maintenance: Maintenance) -> AsyncIterator[None]:
    """The worker's periodic runs while open (``maintenance_interval`` 0: none); on exit the run in
    progress, if any, is cancelled and awaited."""
    interval = settings.maintenance_interval
    task = asyncio.create_task(run_periodically(maintenance, interval)) if interval > 0 else None
    try:
        yield None
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
