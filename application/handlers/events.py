"""What every source's handler shares: the message's transaction, and the incidents it locks and changes.

Every source reduces to the same few events on a dedup key - *fired*, *resolved*, *acknowledged*... at the
event's own time - and the rules for those live in the entity (application/incidents.py);
:class:`LockedIncidents` only finds the incident an event is for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from application.dispatcher import Context
from application.incidents import Incident, IncidentPolicy, OpenGroup, correlation_group
from application.ports import ChangedIncident, IncidentStore, Transaction

Fields = dict[str, Any]  # the fields of an incident this event would open


@asynccontextmanager
async def message_transaction(
    store: IncidentStore,
    ctx: Context,
    changes: Iterable[ChangedIncident],
    dedup_keys: Collection[str] = (),
    scopes: Collection[tuple[str, str]] = (),
) -> AsyncIterator[Transaction]:
    """The message's one store transaction, recording ``changes``: the incidents the message changes.

    They are recorded whether or not the message was already processed, because a redelivery must
    find the same follow-ups (application/side_effects.py). Once the transaction has committed, its
    record goes to the dispatcher's after-commit steps (``ctx.changes``); after a failure it does not.
    """
    async with store.transaction(ctx.idempotency_key, dedup_keys, scopes) as tx:
        tx.changes.extend(changes)
        yield tx
    ctx.changes.extend(tx.changes)


class LockedIncidents:
    """The incidents one message changes, by dedup key: locked and loaded once, then changed event by
    event (``latest`` holds each key's newest incident, as changed so far)."""

    def __init__(self, tx: Transaction, ctx: Context, policy: IncidentPolicy) -> None:
        self._tx = tx
        self._ctx = ctx
        self._policy = policy
        self.latest: dict[str, Incident] = {}
        self._scopes: list[tuple[str, str]] = []
        self._groups: dict[str, OpenGroup] | None = None  # read once, when the first incident opens

    async def load(self, dedup_keys: Collection[str], scopes: Collection[tuple[str, str]] = ()) -> None:
        """Lock and read the dedup keys; remember the (service, environment) scopes of new incidents.

        A scope is locked only when an incident is about to be opened in it (so that two incidents
        opened at once agree on their correlation group), and then all of them at once, after the
        dedup keys: every transaction locks in that order, so none waits on another in a cycle.
        """
        self._scopes = LockedIncidents.scopes(scopes)
        self.latest = await self._tx.latest(dedup_keys)

    def correlate_in(self, scopes: Collection[tuple[str, str]]) -> None:
        """Narrow the scopes locked and read at the first opening to these (every opening's scope)."""
        self._scopes = LockedIncidents.scopes(scopes)

    @staticmethod
    def scopes(scopes: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The scopes :meth:`load` would lock (incidents without a service are not correlated), for
        announcing them to ``store.transaction``."""
        return sorted({scope for scope in scopes if scope[0]})

    async def fire(self, key: str, at: datetime, actor: str, fields: Fields, note: str = "") -> Incident:
        """Open an incident, count an occurrence on the open one (dedup), or open a successor."""
        current = self.latest.get(key)
        if current is not None and not current.starts_new_episode(at):
            current.record_occurrence(at=at, actor=actor, message_id=self._ctx.message_id, note=note)
            await self._tx.update(current)
            return current
        opened: dict[str, Any] = {
            "message_id": self._ctx.message_id,
            "note": note,
            "dedup_key": key,
            **fields,
        }
        if current is not None:
            new = current.successor(at=at, actor=actor, **opened)
        else:
            new = Incident.open(at=at, actor=actor, **opened)
        groups = await self._open_groups()
        new.correlation_group = correlation_group(new, groups.values(), self._policy.window)
        joined = groups.get(new.correlation_group) or OpenGroup.started_by(new)
        groups[new.correlation_group] = joined.joined_by(new)
        self.latest[key] = new
        await self._tx.add(new)
        return new

    async def resolve(
        self,
        key: str,
        at: datetime,
        actor: str,
        fields: Fields,
        *,
        started: datetime | None = None,
        note: str = "",
    ) -> Incident:
        """Resolve the latest incident; with none yet, keep an already-resolved one (see the entity)."""
        current = self.latest.get(key)
        if current is not None:
            current.resolve(at=at, actor=actor, message_id=self._ctx.message_id, note=note)
            await self._tx.update(current)
            return current
        new = Incident.already_resolved(
            started=started, at=at, actor=actor, message_id=self._ctx.message_id, dedup_key=key, **fields
        )
        new.correlation_group = str(new.id)
        self.latest[key] = new
        await self._tx.add(new)
        return new

    async def _open_groups(self) -> dict[str, OpenGroup]:
        if self._groups is None:
            found = await self._tx.open_groups(self._scopes) if self._scopes else []
            self._groups = {group.name: group for group in found}
        return self._groups
