"""End to end, as a user runs it: `python app.py worker --from FILE` with AI analysis on, against the
model stand-in; then `incidents show` prints the analysis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from application.analysis import analyses
from infra.sqlite.store import SqliteStore
from tests.ai.conftest import RUNBOOKS, labelled
from tests.standins.llm import API_KEY, ModelStandIn

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55word-from-a-label"


@pytest.mark.parametrize("provider", ["openai", "bedrock"])
async def test_an_incident_fed_through_the_worker_gets_a_grounded_analysis(
    llm: ModelStandIn, tmp_path: Path, provider: str
) -> None:
    """Two alerts and an AWS Health issue through the worker, on either provider: each incident at or
    above `high` gets one validated `analysis` entry citing the runbook that answers it; the API key
    file's key authenticates (openai), requests are SigV4-signed (bedrock); no label secret reaches the
    model; `incidents show` prints the answer; every message is acked."""
    llm.api_key = API_KEY
    (tmp_path / "key").write_text(API_KEY + "\n")
    cases = [labelled("postgres-too-many-connections.md"), labelled("kube-pod-crashlooping.md"),
             labelled("aws-regional-service-issue.md")]  # fmt: skip
    cases[0]["data"]["alerts"][0]["labels"]["db_password"] = SECRET
    feed = tmp_path / "events.jsonl"
    feed.write_text("".join(json.dumps({"type": c["type"], "data": c["data"]}) + "\n" for c in cases))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INCIDENTD_")} | {
        "INCIDENTD_SQLITE_PATH": str(tmp_path / "incidentd.db"),
        "INCIDENTD_AI_ENABLED": "true",
        "INCIDENTD_AI_PROVIDER": "openai",
        "INCIDENTD_AI_MODEL": "standin-1",
        "INCIDENTD_AI_BASE_URL": llm.url + "/v1",
        "INCIDENTD_AI_API_KEY_FILE": str(tmp_path / "key"),
        "INCIDENTD_AI_KNOWLEDGE_DIR": str(RUNBOOKS),
    }
    if provider == "bedrock":
        env |= {
            "INCIDENTD_AI_PROVIDER": "bedrock", "INCIDENTD_AI_MODEL": "anthropic.claude-3-haiku-v1:0",
            "INCIDENTD_AI_ENDPOINT_URL": llm.url, "INCIDENTD_AI_REGION": "eu-west-1",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        }  # fmt: skip
        env.pop("AWS_PROFILE", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", "worker", "--from", str(feed), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, err.decode()[-3000:]
    assert out.decode().startswith("messages: 6 acked, 0 dead-lettered, 0 retried"), out.decode()

    assert len(llm.calls) == 3 and {call.api for call in llm.calls} == {provider}
    assert all(SECRET not in call.prompt for call in llm.calls)
    store = await SqliteStore.open(tmp_path / "incidentd.db")
    try:
        found = await store.list()
    finally:
        await store.close()
    by_runbook = {}
    for incident in found:
        [record] = analyses(incident)
        assert record.outcome == "ok" and record.answer is not None, record.error
        by_runbook[record.answer.cited[0].split("#")[0]] = incident
        assert [e.kind for e in incident.timeline].count("analysis") == 1
    assert set(by_runbook) == {c["runbook"] for c in cases}

    incident = by_runbook["postgres-too-many-connections.md"]
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "app.py", "incidents", "show", str(incident.id)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "analysis (" in shown.stdout and "a suggestion, not an action" in shown.stdout
    assert "next: follow the runbook's diagnosis  [postgres-too-many-connections.md#" in shown.stdout
