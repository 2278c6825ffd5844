"""incidentd's own commands (the CLI's ``incidents create|ack|resolve|note``, the API's actions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from application.commands import AcknowledgeIncident, AddNote, CreateIncident, IncidentRef, ResolveIncident
from application.dispatcher import Context
from application.errors import PermanentError, TransientError
from application.handlers.events import LockedIncidents, message_transaction
from application.incidents import Incident, IncidentPolicy
from application.ports import ChangedIncident, IncidentStore, Transaction


async def create_incident(
    cmd: CreateIncident, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    key = cmd.dedup_key or f"manual:{ctx.idempotency_key}"
    fields = {
        "title": cmd.title, "service": cmd.service, "environment": cmd.environment, "severity": cmd.severity,
        "source": "manual", "runbook_url": cmd.runbook_url,
        "source_alert": {"description": cmd.description} if cmd.description else {},
    }  # fmt: skip
    async with message_transaction(store, ctx, [ChangedIncident(key)]) as tx:
        if tx.already_processed:
            return
        incidents = LockedIncidents(tx, ctx, policy)
        await incidents.load([key], [(cmd.service, cmd.environment)])
        await incidents.fire(key, cmd.at, cmd.actor, fields)


async def acknowledge_incident(cmd: AcknowledgeIncident, ctx: Context, store: IncidentStore) -> None:
    async with _referenced_incident(cmd, ctx, store) as incident:
        if incident is not None:
            incident.acknowledge(at=cmd.at, actor=cmd.actor, message_id=ctx.message_id, note=cmd.note)


async def resolve_incident(cmd: ResolveIncident, ctx: Context, store: IncidentStore) -> None:
    async with _referenced_incident(cmd, ctx, store) as incident:
        if incident is not None:
            incident.resolve(at=cmd.at, actor=cmd.actor, message_id=ctx.message_id, note=cmd.note)


async def add_note(cmd: AddNote, ctx: Context, store: IncidentStore) -> None:
    async with _referenced_incident(cmd, ctx, store) as incident:
        if incident is not None:
            incident.add_note(note=cmd.note, at=cmd.at, actor=cmd.actor, message_id=ctx.message_id)


@asynccontextmanager
async def _referenced_incident(
    cmd: IncidentRef, ctx: Context, store: IncidentStore
) -> AsyncIterator[Incident | None]:
    """The incident ``cmd`` names, locked, for the block to change; stored when the block ends. None
    when the message was already processed (the block must then change nothing)."""
    async with message_transaction(store, ctx, [_changed(cmd)]) as tx:
        if tx.already_processed:
            yield None
            return
        incident = await _referenced(tx, cmd)
        yield incident
        await tx.update(incident)


def _changed(cmd: IncidentRef) -> ChangedIncident:
    """The incident named by id, else by dedup key (an id wins when both are given, as in _referenced)."""
    if cmd.incident_id is not None:
        return ChangedIncident(incident_id=cmd.incident_id)
    return ChangedIncident(cmd.dedup_key)


async def _referenced(tx: Transaction, cmd: IncidentRef) -> Incident:
    if cmd.incident_id is not None:
        incident = await tx.get(cmd.incident_id)
        if incident is None:
            # Ids are made by the worker when it opens an incident: an unknown id never appears later.
            raise PermanentError(f"no incident {cmd.incident_id}")
        return incident
    found = (await tx.latest([cmd.dedup_key])).get(cmd.dedup_key)
    if found is None:
        # The create may still be in flight (deliveries are not ordered): retry, bounded by max_attempts.
        raise TransientError(f"no incident with dedup key {cmd.dedup_key!r} (yet)")
    return found
