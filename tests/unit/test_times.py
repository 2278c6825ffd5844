"""Event times: every time a command carries is timezone-aware UTC and plausible, or the message is one
dead letter on its first delivery; the entity never compares a naive with an aware time."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from application.commands import AlertmanagerWebhook, CreateIncident, OpsgenieAction
from application.errors import DecodeError
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident, OpenGroup, correlation_group
from application.messages import Message
from tests.conftest import fixture_json

factory = CommandFactory(HANDLERS)
RECEIVED = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def decode(body: dict[str, Any], type_name: str | None = None) -> Any:
    attributes = {"type": type_name} if type_name else {}
    return factory.decode(Message(json.dumps(body).encode(), attributes, "m-1", RECEIVED))


def create(at: str) -> dict[str, Any]:
    return {"title": "t", "service": "payments", "environment": "production", "dedup_key": "k", "at": at}


def test_a_naive_time_is_rejected_naming_the_field():
    """`"at": "2026-01-01T10:00:00"` (no offset) is a DecodeError naming `at`: its meaning depends on the
    sender's clock zone, so incidentd does not guess."""
    with pytest.raises(DecodeError, match=r"incident.create: at: .*timezone"):
        decode(create("2026-12-01T10:00:00"), "incident.create")


def test_an_offset_time_is_stored_as_utc():
    """A time with an offset becomes the same instant in UTC (SQLite compares the stored text)."""
    command = decode(create("2026-12-01T10:00:00+05:30"), "incident.create")
    assert command.at == datetime(2026, 12, 1, 4, 30, tzinfo=UTC)
    assert command.at.utcoffset() == timedelta(0) and command.at.tzinfo is UTC


@pytest.mark.parametrize(
    "at",
    ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-12:00", "1970-01-21T00:00:00Z",
     "2030-01-01T00:00:00Z"],
)  # fmt: skip
def test_an_implausible_time_is_rejected_on_decode(at):
    """Year 1, year 9999 (and +14:00 offsets that overflow), 1970 or years ahead: a DecodeError saying the
    time is out of range, so the message is dead-lettered at once instead of overflowing later."""
    with pytest.raises(DecodeError, match=r"at: .*(implausible|range)"):
        decode(create(at), "incident.create")


def test_alertmanager_no_end_sentinel_is_still_accepted(payload):
    """Alertmanager's `endsAt: 0001-01-01T00:00:00Z` ("still firing") is not an implausible time."""
    body = payload("alertmanager_firing")
    for alert in body["alerts"]:
        alert["endsAt"] = "0001-01-01T00:00:00Z"
    sent = datetime(2026, 11, 23, 10, tzinfo=UTC)
    command = factory.decode(Message(json.dumps(body).encode(), {}, "m", sent))
    assert isinstance(command, AlertmanagerWebhook)
    assert all(a.ends_at is None for a in command.alerts)


def test_alertmanager_naive_starts_at_is_rejected(payload):
    """A relay that drops the offset of `startsAt` gets a dead letter naming the alert's field."""
    body = payload("alertmanager_firing")
    body["alerts"][0]["startsAt"] = "2026-11-23T10:00:00"
    with pytest.raises(DecodeError, match=r"alerts\.0\.startsAt: .*timezone"):
        factory.decode(Message(json.dumps(body).encode(), {}, "m", datetime(2026, 11, 23, 10, tzinfo=UTC)))


@pytest.mark.parametrize(
    ("created", "updated"),
    [
        (1763892000, 1763892300),  # seconds
        (1763892000000, 1763892300000),  # milliseconds (updatedAt relayed in ms)
        (1763892000000000, 1763892300000000),  # microseconds
        (1763892000000000000, 1763892300000000000),  # nanoseconds
    ],
)
def test_oec_epoch_values_are_read_by_magnitude(payload, created, updated):
    """OEC's createdAt / updatedAt in s, ms, µs or ns all mean the same instant (never a 1970 event)."""
    body = payload("oec_acknowledge")
    body["alert"]["createdAt"], body["alert"]["updatedAt"] = created, updated
    command = factory.decode(Message(json.dumps(body).encode(), {}, "m", RECEIVED))
    assert isinstance(command, OpsgenieAction)
    assert command.alert.created_at == 1763892000000  # milliseconds, as the handler reads it
    assert command.alert.updated_at == 1763892300000000000  # nanoseconds


@pytest.mark.parametrize("value", [-62135596800001, 253402300800000, 2.5e20, 10**400, -1, 1.5e308, "soon"])
def test_oec_epoch_values_out_of_range_are_rejected(payload, value):
    """Epoch values that would overflow or mean a year far from the message are a DecodeError."""
    body = payload("oec_acknowledge")
    body["alert"]["updatedAt"] = value
    with pytest.raises(DecodeError, match=r"alert\.updatedAt"):
        factory.decode(Message(json.dumps(body).encode(), {"type": "opsgenie.action"}, "m", RECEIVED))
    with pytest.raises(DecodeError, match=r"alert\.updatedAt|number"):  # without a type: orjson reads it
        factory.decode(Message(json.dumps(body).encode(), {}, "m", RECEIVED))


def test_security_hub_naive_updated_at_is_rejected(payload):
    """An ASFF `UpdatedAt` without an offset is rejected too (the handler orders findings by it)."""
    body = payload("aws_securityhub")
    body["detail"]["findings"][0]["UpdatedAt"] = "2026-11-23T09:30:00"
    with pytest.raises(DecodeError, match=r"UpdatedAt: .*timezone"):
        factory.decode(Message(json.dumps(body).encode(), {}, "m", RECEIVED))


def test_the_entity_reads_a_stored_naive_time_as_utc():
    """An incident stored before this rule (a naive `created_at` in the document) loads as UTC, and its
    events compare with aware ones instead of raising TypeError."""
    incident = Incident.open(
        at=datetime(2026, 1, 1, 10), actor="a", message_id="m", title="t", source="manual", dedup_key="k"
    )
    loaded = Incident.model_validate_json(incident.model_dump_json())
    assert loaded.created_at.tzinfo is not None
    loaded.acknowledge(at=datetime(2026, 1, 1, 11, tzinfo=UTC), actor="b", message_id="m2")
    loaded.resolve(at=datetime(2026, 1, 1, 12), actor="b", message_id="m3")
    assert loaded.status == "resolved"
    group = OpenGroup("g", "s", "e", datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 10))
    fresh = Incident.open(at=datetime(2026, 1, 1, 10, 1, tzinfo=UTC), actor="a", message_id="m", title="t",
                          source="manual", dedup_key="k2", service="s", environment="e")  # fmt: skip
    assert correlation_group(fresh, [group], timedelta(seconds=300)) == "g"


# --- properties ------------------------------------------------------------------------------------------

offsets = st.one_of(
    st.none(),
    st.sampled_from([timedelta(hours=14), timedelta(hours=-12), timedelta(hours=5, minutes=45)]),
    st.timedeltas(min_value=timedelta(hours=-23, minutes=59), max_value=timedelta(hours=23, minutes=59)),
)
times = st.builds(
    lambda naive, offset: naive if offset is None else naive.replace(tzinfo=timezone(offset)),
    st.one_of(
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
        st.datetimes(min_value=datetime(2016, 12, 1), max_value=datetime(2026, 12, 10)),
    ),
    offsets,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(first=times, second=times)
def test_any_pair_of_times_either_dead_letters_or_applies_without_error(first, second):
    """Whatever times two events carry (naive, odd offsets, extreme years), each decodes into a UTC time
    in range or is a DecodeError; decoded ones open, correlate and transition an incident without raising."""
    decoded = []
    for at in (first, second):
        try:
            command = decode(create(at.isoformat()), "incident.create")
        except DecodeError as exc:
            assert "at:" in str(exc)
            continue
        assert isinstance(command, CreateIncident)
        assert command.at.tzinfo is UTC
        assert RECEIVED - timedelta(days=3660) <= command.at <= RECEIVED + timedelta(days=2)
        decoded.append(command.at)
    if not decoded:
        return
    incident = Incident.open(at=decoded[0], actor="a", message_id="m", title="t", source="manual",
                             dedup_key="k", service="s", environment="e")  # fmt: skip
    group = OpenGroup.started_by(incident)
    for at in decoded:
        later = Incident.open(at=at, actor="a", message_id="m", title="t", source="manual", dedup_key="k2",
                              service="s", environment="e")  # fmt: skip
        correlation_group(later, [group], timedelta(days=365))
        incident.acknowledge(at=at, actor="a", message_id="m")
        incident.resolve(at=at, actor="a", message_id="m")
        incident.starts_new_episode(at)
    assert incident.status == "resolved"


def test_a_bogus_publish_time_does_not_make_valid_events_implausible():
    """A publisher's timestamp of 0 (1970) is not the context: valid times are judged against now."""
    at = datetime.now(UTC).isoformat()
    body = json.dumps(create(at)).encode()
    command = factory.decode(
        Message(body, {"type": "incident.create"}, "m", datetime(1970, 1, 1, tzinfo=UTC))
    )
    assert isinstance(command, CreateIncident)


@settings(max_examples=300, deadline=None)
@given(
    updated=st.one_of(
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([1763892300, 1763892300000, 1763892300000000, 1763892300000000000]),
    )
)
def test_any_oec_epoch_value_is_a_plausible_instant_or_a_decode_error(updated):
    """Whatever number `updatedAt` holds, decoding gives nanoseconds within the plausible window or a
    DecodeError naming `alert.updatedAt`; never an exception or a 1970 event."""
    body = fixture_json("oec_acknowledge")
    body["alert"]["updatedAt"] = updated
    message = Message(json.dumps(body).encode(), {"type": "opsgenie.action"}, "m", RECEIVED)
    try:
        command = factory.decode(message)
    except DecodeError as exc:
        assert "alert.updatedAt" in str(exc)
        return
    ns = command.alert.updated_at
    if ns is not None:
        at = datetime.fromtimestamp(ns / 10**9, UTC)
        assert RECEIVED - timedelta(days=3651) <= at <= RECEIVED + timedelta(days=2)
