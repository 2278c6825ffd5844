"""The state machine under arbitrary delivery orders.

The reference is a fold of the events in *event-time* order; the system receives the same events in a
random order, through the real handlers and store, and must end each dedup key in the status the fold
gives - the state the latest event implies.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from application.commands import AcknowledgeIncident, Command
from application.dispatcher import bind
from application.errors import TransientError
from application.handlers import HANDLERS
from application.incidents import Incident, IncidentPolicy, Status
from infra.sqlite.store import SqliteStore
from tests.incidents.conftest import alertmanager, context, oec, payload
from tests.standins.noop_actions import adapters_off

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
_RANK = {"fire": 0, "ack": 1, "unack": 2, "resolve": 3}
Event = tuple[str, int]  # (kind, seconds after T0)


def reference(events: list[Event]) -> Status | None:
    """What the latest event implies: the events folded in time order (resolution wins a tie)."""
    status: Status | None = None
    for kind, _ in sorted(events, key=lambda e: (e[1], _RANK[e[0]])):
        if kind == "fire" and status in (None, "resolved"):
            status = "open"
        elif kind == "resolve":
            status = "resolved"
        elif kind == "ack" and status == "open":
            status = "acknowledged"
        elif kind == "unack" and status == "acknowledged":
            status = "open"
    return status


def alert_command(fingerprint: str, kind: str, second: int) -> Command:
    at = (T0 + timedelta(seconds=second)).isoformat()
    if kind == "ack":
        return AcknowledgeIncident(dedup_key=f"alertmanager:{fingerprint}", at=at, actor="tester")
    data = payload("alertmanager_firing")
    alert = {**data["alerts"][0], "fingerprint": fingerprint, "startsAt": at}
    alert.update({"status": "firing"} if kind == "fire" else {"status": "resolved", "endsAt": at})
    return alertmanager(alerts=[alert], status=alert["status"])


def oec_command(kind: str, second: int) -> Command:
    action = {"fire": "Create", "ack": "Acknowledge", "unack": "UnAcknowledge", "resolve": "Close"}[kind]
    updated = int((T0 + timedelta(seconds=second)).timestamp() * 1_000_000_000)
    return oec("oec_create", action=action, createdAt=int(T0.timestamp() * 1000), updatedAt=updated)


async def deliver(commands: list[Command]) -> SqliteStore:
    """Run each command through its real handler; a TransientError is redelivered later (bounded)."""
    store = await SqliteStore.open(":memory:")
    handlers = bind(HANDLERS, {"store": store, "policy": IncidentPolicy(), **adapters_off()})
    queue = [(c, 1) for c in commands]
    while queue:
        command, attempt = queue.pop(0)
        try:
            for handler in handlers[type(command)]:
                await handler(command, context())
        except TransientError:
            if attempt < 2 * len(commands):
                queue.append((command, attempt + 1))
    return store


async def latest(store: SqliteStore, key: str) -> Incident | None:
    found = [i for i in await store.list() if i.dedup_key == key]
    unresolved = [i for i in found if i.is_open]
    assert len(unresolved) <= 1, f"two unresolved incidents for {key}"
    by_chain = {i.predecessor for i in found}
    newest = [i for i in found if i.id not in by_chain]  # the one nothing follows
    assert len(newest) <= 1
    return newest[0] if newest else None


def timelines(kinds: tuple[str, ...]) -> st.SearchStrategy[list[Event]]:
    seconds = st.lists(st.integers(1, 60), min_size=1, max_size=8, unique=True)
    return seconds.flatmap(
        lambda ts: st.tuples(*[st.sampled_from(kinds) for _ in ts]).map(
            lambda ks: list(zip(ks, ts, strict=True))
        )
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), a=timelines(("fire", "resolve", "ack")), b=timelines(("fire", "resolve", "ack")))
def test_alertmanager_events_in_any_order_end_in_the_latest_events_state(
    data: Any, a: list[Event], b: list[Event]
) -> None:
    """Firing, resolved and acknowledge events for two fingerprints, delivered in any order, leave each
    fingerprint's latest incident in the status of the time-ordered fold (stale firings never reopen,
    stale acknowledgements never stick, a firing after the resolution opens a new incident)."""
    commands = [alert_command("fp-a", k, t) for k, t in a] + [alert_command("fp-b", k, t) for k, t in b]
    order = data.draw(st.permutations(commands))

    async def run() -> None:
        store = await deliver(list(order))
        try:
            for fingerprint, events in (("fp-a", a), ("fp-b", b)):
                incident = await latest(store, f"alertmanager:{fingerprint}")
                assert (incident.status if incident else None) == reference(events), (fingerprint, events)
        finally:
            await store.close()

    asyncio.run(run())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), events=timelines(("fire", "resolve", "ack", "unack")))
def test_oec_actions_in_any_order_end_in_the_latest_actions_state(data: Any, events: list[Event]) -> None:
    """OEC Create/Acknowledge/UnAcknowledge/Close of one alert, in any order, end in the fold's status.
    Every action carries the whole alert, so an action before its Create opens the incident at the
    alert's createdAt: the reference therefore always includes that firing."""
    order = data.draw(st.permutations([oec_command(k, t) for k, t in events]))

    async def run() -> None:
        store = await deliver(list(order))
        try:
            incident = await latest(store, "opsgenie:orders-db-replication-lag")
            assert incident is not None
            # A Create fires at the alert's createdAt (second 0), whatever its updatedAt.
            as_sent = [("fire", 0) if kind == "fire" else (kind, t) for kind, t in events]
            assert incident.status == reference([("fire", 0), *as_sent]), events
            assert len(await store.list()) == 1
        finally:
            await store.close()

    asyncio.run(run())


def test_replay_examples() -> None:
    """The entity's rules on hand-picked orders: a late resolution older than a recorded firing leaves
    the incident open; an acknowledgement older than the resolution does not stick; a tie goes to the
    resolution."""
    at = [T0 + timedelta(seconds=s) for s in range(6)]
    incident = Incident.open(at=at[1], actor="t", message_id="1", title="x", source="manual", dedup_key="k")
    incident.record_occurrence(at=at[4], actor="t", message_id="2")
    incident.resolve(at=at[3], actor="t", message_id="3")
    assert incident.status == "open" and incident.occurrences == 2
    incident.resolve(at=at[5], actor="t", message_id="4")
    incident.acknowledge(at=at[2], actor="t", message_id="5")
    assert incident.status == "resolved" and incident.acknowledged_at is None
    assert incident.resolved_at == at[5]
    incident.record_occurrence(at=at[5], actor="t", message_id="6")
    assert incident.status == "resolved"
    assert not incident.starts_new_episode(at[5]) and incident.starts_new_episode(
        at[5] + timedelta(seconds=1)
    )
    assert [e.kind for e in incident.timeline] == [
        "opened",
        "occurrence",
        "resolved",
        "resolved",
        "acknowledged",
        "occurrence",
    ]
