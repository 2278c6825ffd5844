"""Handlers: ``async def handle(command, context, <dependencies by name>)``, registered in ``HANDLERS``.

One module per source (Alertmanager, Opsgenie, AWS) and one for incidentd's own commands. Each handler
makes its changes inside one store transaction keyed by the message's idempotency key, so a redelivered
message changes nothing the second time, and records on it the incidents the message changes
(:func:`~application.handlers.events.message_transaction`). The dispatcher's after-commit steps run the
side effects (action rules, GitHub, Slack, AI analysis requests) from that record, outside the
transaction: application/side_effects.py says in which order and why that is redelivery-safe.
"""

from __future__ import annotations

from collections.abc import Sequence

from application.commands import (
    AcknowledgeIncident,
    AddNote,
    AlertmanagerWebhook,
    AwsEvent,
    Command,
    CreateIncident,
    OpsgenieAction,
    ResolveIncident,
)
from application.dispatcher import Handler
from application.handlers.alertmanager import alertmanager_webhook, enrich_from_cluster
from application.handlers.aws import aws_event
from application.handlers.incident_commands import (
    acknowledge_incident,
    add_note,
    create_incident,
    resolve_incident,
)
from application.handlers.opsgenie import opsgenie_action

__all__ = ["HANDLERS", "alertmanager_webhook"]

HANDLERS: dict[type[Command], Sequence[Handler]] = {
    AlertmanagerWebhook: [alertmanager_webhook, enrich_from_cluster],
    OpsgenieAction: [opsgenie_action],
    AwsEvent: [aws_event],
    CreateIncident: [create_incident],
    AcknowledgeIncident: [acknowledge_incident],
    ResolveIncident: [resolve_incident],
    AddNote: [add_note],
}
