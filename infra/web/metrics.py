"""The HTTP front door's Prometheus metrics, on the same registry as the worker's (the ops server's
``/metrics``). Label values come from a closed set: route names, status codes, problem types."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

# A confirm on a healthy broker takes a few ms; past the publish timeout (10 s) the request is a 503.
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "incidentd_http_requests",
            "HTTP requests answered, by endpoint (route name; 'other' when none matched) and status.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.publish_duration = Histogram(
            "incidentd_http_publish_duration_seconds",
            "Time from publish to the broker's confirm (or failure), by endpoint.",
            ["endpoint"],
            buckets=PUBLISH_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "incidentd_http_rejected",
            "Requests answered with an error, by reason (the problem type: unauthorized, invalid-body, ...).",
            ["reason"],
            registry=registry,
        )

        # Bound children, looked up once per label set: ``labels()`` costs more than the increment itself,
        # and it runs on every request. The label sets are few (routes x statuses).
        self._answered: dict[tuple[str, int], Any] = {}
        self._published: dict[str, Any] = {}

    def answered(self, endpoint: str, status: int) -> None:
        child = self._answered.get((endpoint, status))
        if child is None:
            child = self._answered[(endpoint, status)] = self.requests.labels(
                endpoint=endpoint, status=str(status)
            )
        child.inc()

    def published(self, endpoint: str, seconds: float) -> None:
        child = self._published.get(endpoint)
        if child is None:
            child = self._published[endpoint] = self.publish_duration.labels(endpoint=endpoint)
        child.observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()
