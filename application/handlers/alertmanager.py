"""Alertmanager webhooks: each alert of the batch, by fingerprint, opens or resolves an incident."""

from __future__ import annotations

from datetime import datetime

from application.commands import Alert, AlertmanagerWebhook
from application.dispatcher import Context
from application.handlers.events import Fields, LockedIncidents, message_transaction
from application.incidents import IncidentPolicy
from application.ports import ChangedIncident, Cluster, IncidentStore
from application.side_effects import enrich


async def alertmanager_webhook(
    cmd: AlertmanagerWebhook, ctx: Context, store: IncidentStore, policy: IncidentPolicy
) -> None:
    """Each alert of the batch, by fingerprint: firing opens (or counts an occurrence), resolved resolves.
    A firing alert is what action rules answer (``"opened"``: only if this message opened the incident)."""
    alerts = [(_alert_key(a), a, {**cmd.common_labels, **a.labels}) for a in cmd.alerts]
    keys = [key for key, _, _ in alerts]
    changes = [
        ChangedIncident(key, trigger="opened" if alert.status == "firing" else "", labels=labels)
        for key, alert, labels in alerts
    ]
    async with message_transaction(store, ctx, changes, keys) as tx:
        if tx.already_processed:
            return
        incidents = LockedIncidents(tx, ctx, policy)
        await incidents.load(keys)
        # Correlation scopes are locked (in one statement, after the keys) only where an incident opens.
        incidents.correlate_in(_opening_scopes(alerts, incidents, policy))
        for key, alert, labels in alerts:
            fields = _alert_fields(cmd, alert, labels, policy)
            if alert.status == "firing":
                await incidents.fire(key, alert.starts_at, "alertmanager", fields)
            else:
                ended = _real_time(alert.ends_at) or alert.starts_at
                await incidents.resolve(key, ended, "alertmanager", fields, started=alert.starts_at)


async def enrich_from_cluster(
    cmd: AlertmanagerWebhook,
    ctx: Context,
    store: IncidentStore,
    policy: IncidentPolicy,
    cluster: Cluster | None,
) -> None:
    """Firing alerts that name a Deployment get its state on their incident, or that it is missing
    (before the after-commit steps, so that what people are told includes it)."""
    if cluster is None:
        return
    targets: dict[str, tuple[str, str]] = {}
    for alert in cmd.alerts:
        workload = policy.workload({**cmd.common_labels, **alert.labels})
        if alert.status == "firing" and workload is not None:
            targets[_alert_key(alert)] = workload
    if targets:
        await enrich(targets, ctx, store, cluster)


def _opening_scopes(
    alerts: list[tuple[str, Alert, dict[str, str]]], incidents: LockedIncidents, policy: IncidentPolicy
) -> list[tuple[str, str]]:
    """The scopes in which this batch may open an incident: those of its firing alerts whose key has no
    incident or one that this firing succeeds (a key named twice in the batch counts as opening). Locking
    only these, not every scope of the batch, is what keeps batches of different services apart."""
    counts: dict[str, int] = {}
    for key, _, _ in alerts:
        counts[key] = counts.get(key, 0) + 1
    opening = []
    for key, alert, labels in alerts:
        if alert.status != "firing":
            continue
        current = incidents.latest.get(key)
        if counts[key] > 1 or current is None or current.starts_new_episode(alert.starts_at):
            opening.append(_scope(labels, policy))
    return LockedIncidents.scopes(opening)


def _alert_key(alert: Alert) -> str:
    return f"alertmanager:{alert.fingerprint}"


def _scope(labels: dict[str, str], policy: IncidentPolicy) -> tuple[str, str]:
    return policy.pick(labels, policy.service_labels), policy.pick(labels, policy.environment_labels)


def _alert_fields(
    cmd: AlertmanagerWebhook, alert: Alert, labels: dict[str, str], policy: IncidentPolicy
) -> Fields:
    service, environment = _scope(labels, policy)
    return {
        "title": alert.annotations.get("summary") or labels.get("alertname", "alert"),
        "service": service,
        "environment": environment,
        "severity": policy.severity(labels),
        "source": "alertmanager",
        "runbook_url": alert.annotations.get("runbook_url") or cmd.common_annotations.get("runbook_url", ""),
        "source_alert": {
            "fingerprint": alert.fingerprint, "status": alert.status,
            "startsAt": alert.starts_at.isoformat(), "labels": alert.labels,
            "annotations": alert.annotations, "generatorURL": alert.generator_url,
            "groupKey": cmd.group_key, "commonLabels": cmd.common_labels, "externalURL": cmd.external_url,
        },
    }  # fmt: skip


def _real_time(value: datetime | None) -> datetime | None:
    """Alertmanager sends ``0001-01-01T00:00:00Z`` for "no end yet"."""
    return value if value is not None and value.year > 1970 else None
