"""deploy/prometheus/rules.yaml passes ``promtool check rules`` and its unit tests
(``promtool test rules``); deploy/grafana/incidentd.json is a dashboard whose every query parses and
names only metrics incidentd exports; the incident transitions counter the dashboard reads counts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from infra.incident_metrics import IncidentMetrics
from infra.metrics import Metrics
from infra.web.metrics import HttpMetrics
from tests.api.conftest import incident
from tests.services import require

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "incidentd.json"
# Metrics of other exporters the rules read (RabbitMQ's plugin, kube-state-metrics, Prometheus itself).
FOREIGN = {"rabbitmq_queue_consumers", "kube_pod_status_ready", "up"}


def promtool() -> str:
    found = shutil.which("promtool")
    require(found is not None, "promtool (Debian's prometheus package)", "bash .ci/install-api.sh")
    assert found is not None
    return found


def exported() -> set[str]:
    """Every sample name incidentd's processes export (worker, incidents, HTTP), with _total, _bucket..."""
    registry = CollectorRegistry()
    Metrics(registry, command_types=["incident.create"])
    IncidentMetrics(registry)
    HttpMetrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?=\{|\[|\))", expr))
    return {w for w in words if w.startswith(("incidentd_", "rabbitmq_", "kube_")) or w == "up"}


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """promtool accepts the rules file and every alert fires (and stays silent) as its unit test says."""
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", "rules.yaml"], cwd=RULES, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    test = subprocess.run(
        [tool, "test", "rules", "rules.test.yaml"], cwd=RULES, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_the_rules_cover_the_four_failures_and_read_existing_metrics() -> None:
    """Dead letters growing, retry rate high, no consumer, readiness failing - on metrics that exist."""
    text = (RULES / "rules.yaml").read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert {"IncidentdDeadLettersGrowing", "IncidentdRetryRateHigh", "IncidentdNoConsumer",
            "IncidentdNotReady"} <= set(alerts)  # fmt: skip
    used = metric_names(text)
    assert used - exported() - FOREIGN == set()
    tests = (RULES / "rules.test.yaml").read_text()
    assert set(alerts) <= set(re.findall(r"alertname: (\w+)", tests)), "an alert without a unit test"


def test_every_dashboard_query_parses_and_reads_exported_metrics(tmp_path: Path) -> None:
    """Each panel's PromQL (Grafana's variables replaced by values) parses - promtool checks it as a
    recording rule - and names only metrics incidentd exports; the dashboard has the panels asked for."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("by service", "MTTA", "MTTR", "by environment", "heatmap", "Throughput", "dead letters",
                   "drain"):  # fmt: skip
        assert wanted in titles, wanted
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    substitutions = {"$__rate_interval": "5m", "$range_window": "1d", "$job": ".*", "$ingest_job": ".*",
                     "$service": ".*", "$environment": ".*"}  # fmt: skip
    rules = []
    for n, expr in enumerate(exprs):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        assert metric_names(expr) and metric_names(expr) <= exported(), expr
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "queries.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    check = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    datasources = {json.dumps(t["datasource"]) for p in panels for t in p["targets"]}
    assert datasources == {'{"type": "prometheus", "uid": "${datasource}"}'}


def test_transitions_count_opened_acknowledged_resolved_by_service_and_environment() -> None:
    """incidentd_incident_transitions_total (the dashboard's per-service and per-environment panels):
    one "opened" per new incident, one "acknowledged" and one "resolved" per transition, never twice."""
    registry = CollectorRegistry()
    metrics = IncidentMetrics(registry)
    opened = incident("a", service="api", environment="prod")
    metrics.changed(opened, None)
    acked = incident("a", service="api", environment="prod", acknowledged=timedelta(minutes=1))
    metrics.changed(acked, "open")
    metrics.changed(acked, "acknowledged")  # a redelivery changing nothing else
    done = incident("b", service="db", environment="dev", resolved=timedelta(minutes=1))
    metrics.changed(done, None)  # opened and resolved by one message

    def value(transition: str, service: str, environment: str) -> float:
        labels = {"transition": transition, "service": service, "environment": environment}
        return registry.get_sample_value("incidentd_incident_transitions_total", labels) or 0.0

    assert value("opened", "api", "prod") == 1 and value("acknowledged", "api", "prod") == 1
    assert value("opened", "db", "dev") == 1 and value("resolved", "db", "dev") == 1
    assert value("resolved", "api", "prod") == 0
