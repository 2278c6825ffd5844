"""Prometheus metrics of the AI analysis, on the ops registry (docs/ai.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class AnalysisMetrics:
    """:class:`application.analysis.AnalysisObserver`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.analyses = Counter(
            "incidentd_ai_analyses", "Analyses by outcome (ok, cached, failed, skipped)", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "incidentd_ai_analysis_seconds", "Time of one analysis, model calls included",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120), registry=registry,
        )  # fmt: skip
        self.tokens = Counter("incidentd_ai_tokens", "Model tokens used", ["direction"], registry=registry)

    def analysed(self, outcome: str, latency: float, input_tokens: int, output_tokens: int) -> None:
        self.analyses.labels(outcome).inc()
        self.latency.observe(latency)
        self.tokens.labels("input").inc(input_tokens)
        self.tokens.labels("output").inc(output_tokens)
