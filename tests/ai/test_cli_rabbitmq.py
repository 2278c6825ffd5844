"""``incidents analyze`` end to end on RabbitMQ: the CLI publishes incident.analyze, a worker process with
AI on (against the model stand-in) analyses, and ``incidents show`` reads the answer."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import pytest

from config.settings import Settings
from tests.ai.conftest import RUNBOOKS
from tests.incidents.conftest import FIXTURES
from tests.incidents.test_cli_rabbitmq import ROOT, _app, _env, _eventually
from tests.rabbitmq.conftest import rabbitmq, settings  # noqa: F401 - fixtures
from tests.standins.llm import ModelStandIn

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_analyze_is_published_and_answered_by_the_worker(
    settings: Settings,  # noqa: F811
    llm: ModelStandIn,
    tmp_path: Any,
) -> None:
    """A critical alert is analysed when it opens; ``incidents analyze ID`` prints a message id and the
    worker records a second analysis, from the cache (nothing changed), without a second model call."""
    env = _env(settings, tmp_path / "incidents.db") | {
        "INCIDENTD_AI_ENABLED": "true", "INCIDENTD_AI_MODEL": "standin-1",
        "INCIDENTD_AI_BASE_URL": llm.url + "/v1", "INCIDENTD_AI_KNOWLEDGE_DIR": str(RUNBOOKS),
    }  # fmt: skip
    await _app(env, "setup")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", "worker", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _app(env, "publish", "alertmanager.webhook", str(FIXTURES / "alertmanager_firing.json"))

        async def analysed(count: int) -> dict[str, Any] | None:
            found = json.loads(await _app(env, "incidents", "list", "--json"))
            done = [i for i in found if len(i["enrichment"].get("ai", {}).get("analyses", [])) >= count]
            return done[0] if done else None

        async def first() -> dict[str, Any] | None:
            return await analysed(1)

        incident = await _eventually(first)
        message_id = (await _app(env, "incidents", "analyze", incident["id"])).strip()
        assert message_id

        async def second() -> dict[str, Any] | None:
            found = await analysed(2)
            return found if found and found["id"] == incident["id"] else None

        incident = await _eventually(second)
        records = incident["enrichment"]["ai"]["analyses"]
        assert [(r["reason"], r["outcome"]) for r in records] == [("opened", "ok"), ("requested", "cached")]
        assert [e["message_id"] for e in incident["timeline"] if e["kind"] == "analysis"][-1] == message_id
        shown = await _app(env, "incidents", "show", incident["id"])
        assert "analysis (" in shown and "next: follow the runbook's diagnosis" in shown
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 40)
    # The two alerts of the batch opened two incidents (both critical): two model calls, not three.
    assert len(llm.calls) == 2
