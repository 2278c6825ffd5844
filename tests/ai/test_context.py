"""What the prompt holds: the documented order of sections, redaction of secrets by name and by shape,
and the metrics of an analysis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from application.analysis import REDACTED, build_prompt, redact_mapping, redact_text
from application.incidents import Incident
from application.ports import Passage
from infra.ai.metrics import AnalysisMetrics

AT = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def incident(at: datetime = AT, **fields: object) -> Incident:
    values: dict[str, object] = {
        "title": "orders database: too many connections", "service": "orders", "environment": "production",
        "severity": "critical", "source": "alertmanager", "dedup_key": "alertmanager:abc",
        "source_alert": {"labels": {"alertname": "PostgresTooManyConnections"},
                         "annotations": {"summary": "96% of max_connections"}},
    } | fields  # fmt: skip
    return Incident.open(at=at, actor="alertmanager", message_id="m-1", **values)


def test_secrets_are_redacted_by_their_shape_wherever_they_appear() -> None:
    """Keys, tokens, URL passwords, bearer headers and private keys in free text become [redacted];
    ordinary words, ids with dashes and numbers stay."""
    text = (
        "db postgres://app:hunter2@db:5432/orders token=abc123 Authorization: Bearer abcdefghijkl.mnop "
        "key AKIAIOSFODNN7EXAMPLE pat ghp_0123456789abcdefghijABCDEFGHIJ slack xoxb-1-2-abcdefghijk "
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY----- "
        "blob 9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c "
        "pod checkout-7d9f8-abcde restarted 7 times in deployment shop/checkout"
    )
    clean = redact_text(text)
    for secret in ("hunter2", "abc123", "abcdefghijkl.mnop", "AKIAIOSFODNN7EXAMPLE", "ghp_", "xoxb-",
                   "MIIEow", "9f8e7d6c5b4a3928"):  # fmt: skip
        assert secret not in clean
    assert "pod checkout-7d9f8-abcde restarted 7 times in deployment shop/checkout" in clean
    assert "postgres://" in clean and "@db:5432/orders" in clean


def test_secret_names_are_redacted_in_nested_mappings() -> None:
    """Values under names like password, token, api_key, secret, webhook_url are redacted at any depth,
    whatever they look like; other values are kept."""
    found = redact_mapping(
        {"labels": {"db_password": "plain", "team": "payments"},
         "details": [{"API_KEY": "x"}, {"owner": "alice"}], "webhook_url": "u"}
    )  # fmt: skip
    assert found == {
        "labels": {"db_password": REDACTED, "team": "payments"},
        "details": [{"API_KEY": REDACTED}, {"owner": "alice"}], "webhook_url": REDACTED,
    }  # fmt: skip


def test_the_prompt_holds_the_sections_in_the_documented_order() -> None:
    """Incident, timeline, source alert, enrichment, correlation group, history (with what fixed it),
    runbook passages - in that order; the incident's own earlier analyses are not part of it."""
    subject = incident()
    subject.record_fact(kind="analysis", actor="ai", note="an earlier answer", at=AT, message_id="m-2")
    subject.enrichment["kubernetes"] = {"summary": "Deployment shop/orders: 2/3 ready"}
    subject.enrichment["ai"] = {"summary": "an earlier answer", "analyses": []}
    sibling = incident(title="orders p99 latency high")
    old = incident(at=AT - timedelta(days=3))
    old.add_note(note="raised the pool size of the orders service", at=AT - timedelta(days=3), actor="bob",
                 message_id="m-0")  # fmt: skip
    old.resolve(at=AT - timedelta(days=3) + timedelta(minutes=42), actor="bob", message_id="m-0")
    passage = Passage("pg.md#remediation", "pg.md", "PostgreSQL > Remediation", "Use PgBouncer.")
    prompt = build_prompt(
        subject, group=[sibling], history=[old], passages=[passage], budget=10_000, model="m"
    )

    titles = [line for line in prompt.user.splitlines() if line.startswith("## ")]
    assert titles == ["## Incident", "## Timeline (oldest first)", "## Source alert: labels and annotations",
                      "## Enrichment", "## Other incidents of its correlation group",
                      "## Previous resolved incidents of the same dedup key and service",
                      "## Runbook passages (cite by the id in brackets)"]  # fmt: skip
    assert "an earlier answer" not in prompt.user
    assert "Deployment shop/orders: 2/3 ready" in prompt.user
    assert "orders p99 latency high" in prompt.user
    assert "note by bob: raised the pool size of the orders service" in prompt.user
    assert "[pg.md#remediation] PostgreSQL > Remediation\nUse PgBouncer." in prompt.user
    assert prompt.passages == (passage,) and prompt.trimmed == ()


def test_metrics_count_analyses_by_outcome_with_latency_and_tokens() -> None:
    """incidentd_ai_analyses_total{outcome}, the latency histogram and the token counters."""
    registry = CollectorRegistry()
    metrics = AnalysisMetrics(registry)
    metrics.analysed("ok", 1.5, 900, 120)
    metrics.analysed("failed", 0.2, 0, 0)
    assert registry.get_sample_value("incidentd_ai_analyses_total", {"outcome": "ok"}) == 1
    assert registry.get_sample_value("incidentd_ai_analyses_total", {"outcome": "failed"}) == 1
    assert registry.get_sample_value("incidentd_ai_analysis_seconds_count") == 2
    assert registry.get_sample_value("incidentd_ai_tokens_total", {"direction": "input"}) == 900
    assert registry.get_sample_value("incidentd_ai_tokens_total", {"direction": "output"}) == 120
