"""The factory: a message becomes the right command, or one DecodeError that names the problem."""

from __future__ import annotations

import json
from typing import Any

import pytest

from application.commands import (
    AcknowledgeIncident,
    AddNote,
    AlertmanagerWebhook,
    AwsEvent,
    CreateIncident,
    HealthDetail,
    OpsgenieAction,
    ResolveIncident,
    SecurityHubDetail,
)
from application.errors import DecodeError
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.messages import Message

factory = CommandFactory(HANDLERS)


def message(body: Any, type_name: str | None = None) -> Message:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Message(raw, {"type": type_name} if type_name else {}, "m-1")


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("alertmanager_firing", AlertmanagerWebhook),
        ("alertmanager_resolved", AlertmanagerWebhook),
        ("oec_create", OpsgenieAction),
        ("oec_acknowledge", OpsgenieAction),
        ("aws_health", AwsEvent),
        ("aws_securityhub", AwsEvent),
    ],
)
def test_external_payloads_are_recognised_by_shape_without_a_type_attribute(payload, fixture, expected):
    """Alertmanager, OEC and EventBridge payloads relayed as-is (no type attribute) become their command."""
    assert type(factory.decode(message(payload(fixture)))) is expected


def test_type_attribute_selects_the_command(payload):
    """With a type attribute, the payload is validated as that type."""
    command = factory.decode(message(payload("oec_create"), "opsgenie.action"))
    assert isinstance(command, OpsgenieAction)
    assert command.action == "Create"
    assert command.alert.alias == "orders-db-replication-lag"


def test_alertmanager_batch_keeps_group_key_all_alerts_and_unknown_fields(payload):
    """Nothing Alertmanager sent is lost: groupKey, every alert, and fields incidentd does not model."""
    body = payload("alertmanager_firing") | {"someFutureField": {"x": 1}}
    command = factory.decode(message(body))
    assert command.group_key == body["groupKey"]
    assert [a.fingerprint for a in command.alerts] == ["c1f0a2b3d4e5f607", "d2e1b3c4f5a60718"]
    assert command.alerts[0].annotations["runbook_url"].startswith("https://runbooks")
    assert command.model_dump(by_alias=True)["someFutureField"] == {"x": 1}


def test_eventbridge_detail_is_typed_by_source(payload):
    """AWS Health and Security Hub events carry a typed detail, chosen by the event's source."""
    health = factory.decode(message(payload("aws_health")))
    hub = factory.decode(message(payload("aws_securityhub")))
    assert isinstance(health.detail, HealthDetail) and health.detail.status_code == "open"
    assert isinstance(hub.detail, SecurityHubDetail) and hub.detail.findings[0].severity.label == "HIGH"


@pytest.mark.parametrize(
    ("type_name", "body", "expected"),
    [
        ("incident.create", {"title": "Disk full", "severity": "high"}, CreateIncident),
        ("incident.acknowledge", {"dedup_key": "disk"}, AcknowledgeIncident),
        ("incident.resolve", {"incident_id": "3b241101-e2bb-4255-8caf-4136c566a962"}, ResolveIncident),
        ("incident.note", {"dedup_key": "disk", "note": "cleaned /var/log"}, AddNote),
    ],
)
def test_incident_commands_decode(type_name, body, expected):
    """Each incident lifecycle command decodes from its type attribute."""
    assert type(factory.decode(message(body, type_name))) is expected


@pytest.mark.parametrize(
    ("body", "type_name", "says"),
    [
        (b"{oops", None, "body is not valid JSON"),
        (b"{oops", "incident.create", "body is not valid JSON"),
        ([1, 2], None, "body is a JSON list, not an object"),
        ("text", "incident.create", "body is not a JSON object"),
        ({"hello": "world"}, None, "no 'type' attribute, and the payload's keys match no known source"),
        ({"title": "x"}, "incident.explode", "unknown command type 'incident.explode'"),
        ({}, "incident.create", "incident.create: title: Field required"),
        ({"title": 42}, "incident.create", "incident.create: title: Input should be a valid string"),
        ({"title": "x", "severity": "apocalyptic"}, "incident.create", "severity: Input should be"),
        ({"note": "x"}, "incident.note", "one of incident_id or dedup_key is required"),
    ],
)
def test_bad_input_raises_one_decode_error_naming_the_problem(body, type_name, says):
    """Not JSON, not an object, unknown type, missing field, wrong type: one DecodeError that says which."""
    with pytest.raises(DecodeError, match=None) as caught:
        factory.decode(message(body, type_name))
    assert says in str(caught.value)


def test_schema_violation_names_the_failing_field_path(payload):
    """A nested violation names its path, so an operator can find it in the payload."""
    body = payload("alertmanager_firing")
    del body["alerts"][1]["fingerprint"]
    body["alerts"][0]["status"] = "burning"
    with pytest.raises(DecodeError) as caught:
        factory.decode(message(body))
    text = str(caught.value)
    assert "alerts.0.status: Input should be 'firing' or 'resolved'" in text
    assert "alerts.1.fingerprint: Field required" in text


def test_eventbridge_detail_type_must_match_source(payload):
    """An aws.health event with another detail-type is rejected rather than misread."""
    body = payload("aws_health") | {"detail-type": "Security Hub Findings - Imported"}
    with pytest.raises(DecodeError, match="detail-type must be 'AWS Health Event'"):
        factory.decode(message(body))
