"""End to end, as a user runs it: an Alertmanager batch about a Deployment goes through `incidentd worker`
(a separate process: container, dispatcher, embedded broker, SQLite) with every adapter enabled against
its stand-in on 127.0.0.1:

* Kubernetes: kmock (the incident is enriched from it, and the label rule's rollout restart patches it);
* GitHub and Slack: the local aiohttp stand-ins (an issue opened, commented and closed; Slack messages);
* ClickHouse: a private clickhouse-server (one row per message).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest

from application.incidents import Incident
from application.ports import ISSUE_LINK
from infra.kubernetes import RESTARTED_AT
from infra.sqlite.store import SqliteStore
from tests.conftest import fixture_json
from tests.lake.server import ClickHouseServer
from tests.standins.chat import REPO, TOKEN, GitHub, Slack
from tests.standins.clickhouse import select
from tests.standins.kubernetes import DEPLOYMENTS, NAMESPACES, deployment, namespace

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
HOOK = "/services/T0/B-api/x"
FIRST, SECOND = "alertmanager:c1f0a2b3d4e5f607", "alertmanager:d2e1b3c4f5a60718"
RULES = [{"name": "restart-on-label", "labels": {"incidentd_action": "restart"}, "action": "restart"}]


def feed(path: Path) -> Path:
    """The firing batch (two pods of Deployment shop/checkout, labelled for the restart rule), then the
    resolution of the first alert."""
    firing = copy.deepcopy(fixture_json("alertmanager_firing"))
    for alert in firing["alerts"]:
        alert["labels"]["incidentd_action"] = "restart"
    resolved = fixture_json("alertmanager_resolved")
    path.write_text("".join(json.dumps(doc) + "\n" for doc in (firing, resolved)))
    return path


def environment(
    tmp_path: Path, k8s_url: str, github: GitHub, slack: Slack, clickhouse: Any, table: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INCIDENTD_", "KUBERNETES_"))}
    return env | {
        "INCIDENTD_SQLITE_PATH": str(tmp_path / "incidentd.db"),
        "INCIDENTD_CONCURRENCY": "1",  # the firing is handled before its resolution
        "INCIDENTD_KUBERNETES_ENABLED": "true",
        "INCIDENTD_KUBERNETES_HOST": k8s_url,
        "INCIDENTD_ACTION_RULES": json.dumps(RULES),
        "INCIDENTD_GITHUB_ENABLED": "true",
        "INCIDENTD_GITHUB_API_URL": github.url,
        "INCIDENTD_GITHUB_REPOSITORY": REPO,
        "INCIDENTD_GITHUB_TOKEN": TOKEN,
        "INCIDENTD_SLACK_ENABLED": "true",
        "INCIDENTD_SLACK_ROUTES": json.dumps(
            [{"match": {"service": "checkout"}, "webhook_url": slack.url + HOOK}]
        ),
        "INCIDENTD_CLICKHOUSE_ENABLED": "true",
        "INCIDENTD_CLICKHOUSE_HOST": clickhouse.host,
        "INCIDENTD_CLICKHOUSE_PORT": str(clickhouse.tcp_port),
        "INCIDENTD_CLICKHOUSE_TABLE": table,
    }


async def run_worker(source: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """`python app.py worker --from FILE` in a process of its own, while this loop serves the stand-ins."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", "worker", "--from", str(source), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def incidents(path: Path) -> dict[str, Incident]:
    store = await SqliteStore.open(path)
    try:
        return {i.dedup_key: i for i in await store.list()}
    finally:
        await store.close()


async def test_an_alert_for_a_deployment_is_enriched_restarted_tracked_announced_and_kept(
    k8s: tuple[kmock.KubernetesEmulator, str],
    github: GitHub,
    slack: Slack,
    clickhouse: ClickHouseServer,
    tmp_path: Path,
) -> None:
    """What a user sees after the worker ran the firing batch and its resolution: both incidents carry
    the Deployment's state and the restart's result; the Deployment's pod template has a fresh
    restartedAt (one restart for the two alerts); each incident has a GitHub issue, the resolved one
    commented and closed; Slack got every transition with its links; ClickHouse has a row per message."""
    emulator, url = k8s
    emulator.objects[NAMESPACES, None, "shop"] = namespace("shop")
    emulator.objects[DEPLOYMENTS, "shop", "checkout"] = deployment(
        "shop", "checkout", replicas=3, ready=2, image="registry.example/checkout:7.1"
    )
    table = f"e2e_{uuid.uuid4().hex[:12]}"
    started = datetime.now(UTC).replace(microsecond=0)

    code, out, err = await run_worker(
        feed(tmp_path / "alerts.jsonl"), environment(tmp_path, url, github, slack, clickhouse, table)
    )

    assert code == 0, err[-3000:]
    assert out.startswith("messages: 2 acked, 0 dead-lettered, 0 retried"), out

    # The store: enrichment, the action's result and the issue link on the incidents.
    found = await incidents(tmp_path / "incidentd.db")
    first, second = found[FIRST], found[SECOND]
    assert (first.status, second.status) == ("resolved", "open")
    facts = first.enrichment["kubernetes"]
    assert (facts["found"], facts["desired_replicas"], facts["ready_replicas"]) == (True, 3, 2)
    assert facts["images"] == ["registry.example/checkout:7.1", "envoy:1"]
    kinds = [(e.kind, e.actor) for e in first.timeline]
    assert kinds == [("opened", "alertmanager"), ("enriched", "kubernetes"), ("action", "incidentd"),
                     ("resolved", "alertmanager")]  # fmt: skip
    [result] = [e.note for e in second.timeline if e.kind == "action"]
    assert result.startswith(f"restart-on-label: rollout restart deployment shop/checkout: {RESTARTED_AT}=")

    # kmock: kubectl's restart annotation, set now.
    obj = emulator.objects[DEPLOYMENTS, "shop", "checkout"]
    restarted = datetime.fromisoformat(obj["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT])
    assert started - timedelta(seconds=1) <= restarted <= datetime.now(UTC)
    assert len(obj.history) == 2  # as created, then one restart for both alerts

    # GitHub: one issue per incident; the resolved one got the action and the resolution, and is closed.
    assert sorted(issue["number"] for issue in github.issues.values()) == [1, 2]
    issue = github.issues[int(first.links[ISSUE_LINK])]
    assert [label["name"] for label in issue["labels"]] == ["incident", "severity:critical"]
    assert "**Kubernetes:** Deployment shop/checkout: 2/3 ready" in issue["body"]
    comments = github.comments[issue["number"]]
    assert ["**action**" in comments[0], "**resolved**" in comments[1]] == [True, True]
    assert issue["state"] == "closed"
    assert github.issues[int(second.links[ISSUE_LINK])]["state"] == "open"

    # Slack: opened and action for each incident, and the resolution; links in the opening message.
    texts = slack.received(HOOK)
    assert len(texts) == 5
    opening = next(t for t in texts if "Checkout 5xx rate above 5% on checkout-7d9f8-abcde* opened" in t)
    issue_link = f"|GitHub issue #{first.links[ISSUE_LINK]}>"
    for expected in ("*Severity:* critical", "*Service:* checkout", "*Kubernetes:* Deployment shop/checkout",
                     "|Runbook>", "|Alertmanager source>", issue_link):  # fmt: skip
        assert expected in opening
    assert sum("action taken by incidentd" in t for t in texts) == 2
    assert sum(":white_check_mark:" in t for t in texts) == 1

    # ClickHouse: a row per message, flushed when the worker shut down.
    rows = await select(clickhouse, f"SELECT command_type, outcome FROM default.{table}")
    assert rows == [{"command_type": "alertmanager.webhook", "outcome": "ack"}] * 2
