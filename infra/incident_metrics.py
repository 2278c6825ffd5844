"""Incident metrics for Prometheus, registered on a registry the caller owns (the ops server's).

Counters and histograms are fed by :class:`IncidentMetrics` as an
:class:`~application.ports.IncidentObserver`: the store reports each committed change once, so summing
them over worker pods is right. The active-incidents gauge is not a sum of per-pod changes (a pod
restarts, another resolves what this one opened): it is read from the store, by :meth:`refresh`, which
:func:`keep_fresh` calls every few seconds. Every pod exports the same store-wide value (so any one
scrape is complete, and no pod is special): aggregate it across pods with ``max``, never ``sum``. Its
``service`` label is bounded: the :data:`MAX_ACTIVE_SERVICES` services with the most unresolved
incidents keep their name, the rest are added up as ``other``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from application.incidents import Incident, Status
from application.ports import IncidentStore

log = structlog.get_logger("incidentd.metrics")

# Services named on incidents come from alert labels (free text): past this many, the gauge folds the
# services with the fewest unresolved incidents into OTHER_SERVICE, so a label flood cannot grow it.
MAX_ACTIVE_SERVICES = 50
OTHER_SERVICE = "other"

# Seconds: 30 s .. 1 day, for human response times.
_BUCKETS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)


class _ActiveIncidents(Collector):
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "incidentd_incidents_active",
            "Unresolved incidents in the whole store, as last read from it; every pod exports the same "
            f"value (aggregate with max, not sum). Top {MAX_ACTIVE_SERVICES} services, the rest as other.",
            labels=["severity", "service"],
        )  # fmt: skip
        for (severity, service), count in sorted(self.counts.items()):
            gauge.add_metric([severity, service], count)
        yield gauge


class IncidentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._active = _ActiveIncidents()
        registry.register(self._active)
        self.opened = Counter(
            "incidentd_incidents_opened", "Incidents opened.", ["source", "severity"], registry=registry
        )
        self.resolved = Counter(
            "incidentd_incidents_resolved", "Incidents resolved.", ["source", "severity"], registry=registry
        )
        self.time_to_acknowledge = Histogram(
            "incidentd_incident_time_to_acknowledge_seconds", "Incident start to acknowledgement.",
            ["severity"], buckets=_BUCKETS, registry=registry,
        )  # fmt: skip
        self.time_to_resolve = Histogram(
            "incidentd_incident_time_to_resolve_seconds", "From an incident's start to its resolution.",
            ["severity"], buckets=_BUCKETS, registry=registry,
        )  # fmt: skip

        # By service and environment, for the Grafana dashboard (deploy/grafana/incidentd.json): incident
        # frequency per service, opened vs resolved per environment. As bounded as incidents_active's.
        self.transitions = Counter(
            "incidentd_incident_transitions",
            "Incidents opened, acknowledged and resolved, by service and environment.",
            ["transition", "service", "environment"], registry=registry,
        )  # fmt: skip

    def changed(self, incident: Incident, previous: Status | None) -> None:
        where = (incident.service, incident.environment)
        if previous is None:
            self.transitions.labels("opened", *where).inc()
        if incident.status == "acknowledged" and previous in (None, "open"):
            self.transitions.labels("acknowledged", *where).inc()
        if incident.status == "resolved" and previous != "resolved":
            self.transitions.labels("resolved", *where).inc()
        if previous is None:
            self.opened.labels(incident.source, incident.severity).inc()
        if incident.status == "acknowledged" and previous in (None, "open") and incident.acknowledged_at:
            elapsed = (incident.acknowledged_at - incident.created_at).total_seconds()
            self.time_to_acknowledge.labels(incident.severity).observe(max(elapsed, 0.0))
        if incident.status == "resolved" and previous != "resolved" and incident.resolved_at:
            self.resolved.labels(incident.source, incident.severity).inc()
            elapsed = (incident.resolved_at - incident.created_at).total_seconds()
            self.time_to_resolve.labels(incident.severity).observe(max(elapsed, 0.0))

    async def refresh(self, store: IncidentStore) -> None:
        self._active.counts = bounded_services(await store.count_active())


def bounded_services(
    counts: dict[tuple[str, str], int], limit: int = MAX_ACTIVE_SERVICES
) -> dict[tuple[str, str], int]:
    """``counts`` by (severity, service) with at most ``limit`` services named; the others' counts are
    added up under :data:`OTHER_SERVICE` (the services with most unresolved incidents keep their name)."""
    totals: collections.Counter[str] = collections.Counter()
    for (_, service), count in counts.items():
        totals[service] += count
    kept = {service for service, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]}
    bounded: collections.Counter[tuple[str, str]] = collections.Counter()
    for (severity, service), count in counts.items():
        bounded[severity, service if service in kept else OTHER_SERVICE] += count
    return dict(bounded)


def register_incident_metrics(registry: CollectorRegistry) -> IncidentMetrics:
    return IncidentMetrics(registry)


async def keep_fresh(metrics: IncidentMetrics, store: IncidentStore, interval: float = 15.0) -> None:
    """Refresh the active gauge until cancelled; a failed read keeps the last value and is logged."""
    while True:
        try:
            await metrics.refresh(store)
        except Exception as exc:
            log.warning("metrics.refresh_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def open_gauge_refresh(metrics: IncidentMetrics, store: IncidentStore) -> AsyncIterator[None]:
    """The active gauge kept fresh while open (by whoever serves /metrics); stopped on exit."""
    task = asyncio.create_task(keep_fresh(metrics, store))
    try:
        yield None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
