"""The Bedrock adapter, the runbook index's rebuild, both stores, the settings and the container: AI
analysis is off by default and then imports nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from application.analysis import Analysis, AnalysisPolicy, analyses
from application.errors import PermanentError, TransientError
from application.ports import ChatTurn
from config.settings import SettingsError, load
from infra.ai.bedrock import BedrockConverse
from infra.ai.knowledge import RunbookIndex
from tests.ai.conftest import RUNBOOKS, AiWorld, Published, labelled
from tests.standins.llm import Behaviour, ModelStandIn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
async def bedrock(llm: ModelStandIn, aws_credentials: None) -> AsyncIterator[BedrockConverse]:
    analyst = BedrockConverse(model="anthropic.claude-3-haiku-20240307-v1:0", region="eu-west-1",
                              endpoint_url=llm.url, timeout=5)  # fmt: skip
    yield analyst
    await analyst.close()


async def test_bedrock_converse_is_called_signed_and_its_answer_read(
    bedrock: BedrockConverse, llm: ModelStandIn
) -> None:
    """Converse through aioboto3: SigV4-signed, system and turns in Converse's shape, the model id in the
    path; the answer's text, token usage and stop reason are read."""
    reply = await bedrock.complete("be brief", [ChatTurn("user", "[a.md#b] A\ntext")], max_tokens=300)
    [call] = llm.calls
    assert call.api == "bedrock" and call.path.startswith("/model/anthropic.claude-3-haiku")
    assert call.headers["Authorization"].startswith("AWS4-HMAC-SHA256 ")
    assert call.json["system"] == [{"text": "be brief"}]
    assert call.json["inferenceConfig"] == {"maxTokens": 300, "temperature": 0}
    assert '"cites": ["a.md#b"]' in reply.text
    assert reply.model == "bedrock/anthropic.claude-3-haiku-20240307-v1:0" and reply.input_tokens > 0
    assert not reply.truncated


@pytest.mark.parametrize(("status", "error"), [(429, TransientError), (500, TransientError),
                                                (400, PermanentError)])  # fmt: skip
async def test_bedrock_errors_are_classified(
    bedrock: BedrockConverse, llm: ModelStandIn, status: int, error: type[Exception]
) -> None:
    """ThrottlingException and 5xx are transient, ValidationException permanent; botocore does not retry
    (one call reaches the endpoint)."""
    llm.script(Behaviour(status=status))
    with pytest.raises(error):
        await bedrock.complete("s", [ChatTurn("user", "u")], max_tokens=100)
    assert len(llm.calls) == 1


async def test_an_incident_is_analysed_through_bedrock(
    store: Any, llm: ModelStandIn, bedrock: BedrockConverse
) -> None:
    """The whole analysis on the Bedrock adapter: a validated answer citing the right runbook."""
    world = AiWorld(
        store, Analysis(bedrock, RunbookIndex(RUNBOOKS), Published(), AnalysisPolicy()), Published(), llm
    )
    world.analysis.publisher = world.published
    incident = await world.feed_case(labelled("aws-ec2-scheduled-retirement.md"))
    await world.analyze(incident)  # AWS Health scheduled changes are low severity: asked for
    [record] = await world.records(incident)
    assert record.outcome == "ok" and record.model.startswith("bedrock/")
    assert record.answer is not None and record.answer.cited[0].startswith("aws-ec2-scheduled-retirement.md#")


async def test_the_runbook_index_follows_the_folder(tmp_path: Path) -> None:
    """A runbook added to (or changed in) the folder is found by the next search, without a restart."""
    index = RunbookIndex(tmp_path)
    assert await index.search("zookeeper session expired", 3) == []
    (tmp_path / "zookeeper.md").write_text(
        "# ZooKeeper sessions expire\n\n## Fix\nRaise the session timeout.\n"
    )
    [found] = await index.search("zookeeper session expired", 3)
    assert (found.source, found.id) == ("zookeeper.md", "zookeeper.md#fix")
    (tmp_path / "zookeeper.md").write_text(
        "# ZooKeeper sessions expire\n\n## Remedy\nRestart the ensemble.\n"
    )
    [found] = await index.search("zookeeper session expired", 3)
    assert found.id == "zookeeper.md#remedy"


@pytest.mark.integration
async def test_postgresql_keeps_the_analysis(postgres_store: Any, llm: ModelStandIn) -> None:
    """The analysis lives in the incident's document: PostgreSQL stores and returns it like SQLite."""
    from tests.ai.conftest import make_world

    async for world in make_world(postgres_store, llm):
        incident = await world.feed_case(labelled("kube-oomkilled.md"))
        await world.run_requests()
        found = await postgres_store.get(incident.id)
        [record] = analyses(found)
        assert record.outcome == "ok" and [e.kind for e in found.timeline] == ["opened", "analysis"]


def test_ai_settings_are_checked_at_start_up() -> None:
    """Enabled without a model, or openai without an endpoint, or a budget smaller than three answers,
    stops start-up naming the setting; enabled, incident.analyze gets a timeout for two model calls."""
    with pytest.raises(SettingsError, match="INCIDENTD_AI_MODEL"):
        load(ai_enabled=True)
    with pytest.raises(SettingsError, match="INCIDENTD_AI_BASE_URL"):
        load(ai_enabled=True, ai_model="m")
    with pytest.raises(SettingsError, match="INCIDENTD_AI_MAX_OUTPUT_TOKENS"):
        load(ai_enabled=True, ai_model="m", ai_provider="bedrock", ai_token_budget=2000)
    settings = load(ai_enabled=True, ai_model="m", ai_base_url="http://127.0.0.1:1/v1", ai_timeout=20)
    assert settings.command_timeouts["incident.analyze"] == 70
    assert not load().ai_enabled


def _imports(tmp_path: Path, **settings: Any) -> list[str]:
    script = textwrap.dedent(
        """
        import asyncio, json, sys
        from config.container import Container
        from config.settings import load

        async def main():
            container = Container(settings=load(sqlite_path=sys.argv[1], **json.loads(sys.argv[2])))
            await container.dispatcher()
            dependencies = await container.handler_dependencies()
            print(type(dependencies["analysis"]).__name__)
            print(sorted(m for m in ("bm25s", "Stemmer", "numpy", "aioboto3", "infra.ai", "infra.ai.openai",
                                     "infra.ai.knowledge") if m in sys.modules))
            await container.shutdown_resources()

        asyncio.run(main())
        """
    )
    import json

    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "incidentd.db"), json.dumps(settings)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_ai_off_imports_none_of_its_libraries(tmp_path: Path) -> None:
    """By default the worker's handlers get no analysis, and neither bm25s / numpy, aioboto3 nor the AI
    adapters are imported (the worker's memory budget depends on it)."""
    assert _imports(tmp_path) == ["NoneType", "[]"]


def test_ai_on_wires_the_openai_adapter_and_the_index(tmp_path: Path) -> None:
    """Enabled with the openai provider: handlers get the analysis; the index and the openai adapter are
    loaded, Bedrock's aioboto3 is not."""
    lines = _imports(tmp_path, ai_enabled=True, ai_model="m", ai_base_url="http://127.0.0.1:9/v1")
    assert lines[0] == "Analysis"
    assert "aioboto3" not in lines[1] and "'infra.ai.openai'" in lines[1] and "'bm25s'" in lines[1]
