"""The AI analysis wired as the container wires it, against the model stand-in (tests/standins/llm.py):
the real OpenAI-compatible adapter, the real BM25 index over tests/fixtures/runbooks, the real handlers
and a real store; only the broker is a list (the requests the worker would publish)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from application.analysis import (
    Analysis,
    AnalysisPolicy,
    AnalysisRecord,
    after_commit_steps,
    analyses,
    with_analysis,
)
from application.commands import AnalyzeIncident, Command
from application.dispatcher import Context, bind, bind_all
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident, IncidentPolicy
from application.messages import TYPE_ATTR, Message
from infra.ai.knowledge import RunbookIndex
from infra.ai.openai import OpenAIChat
from infra.sqlite.store import SqliteStore
from tests.incidents.conftest import pg_schema, postgres_store  # noqa: F401  (fixtures: PostgreSQL)
from tests.standins.llm import ModelStandIn
from tests.standins.noop_actions import adapters_off

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RUNBOOKS = FIXTURES / "runbooks"


def labelled(runbook: str, n: int = 0) -> dict[str, Any]:
    """The ``n``-th labelled incident (tests/fixtures/ai_incidents.jsonl) answered by ``runbook``."""
    cases = [json.loads(line) for line in (FIXTURES / "ai_incidents.jsonl").read_text().splitlines()]
    return [c for c in cases if c["runbook"] == runbook][n]


@dataclass
class Published:
    requests: list[tuple[bytes, dict[str, str], str]] = field(default_factory=list)

    async def publish(
        self, body: bytes, attributes: Mapping[str, str], *, message_id: str | None = None
    ) -> str:
        self.requests.append((body, dict(attributes), message_id or ""))
        return message_id or str(len(self.requests))


@dataclass
class AiWorld:
    store: Any
    analysis: Analysis
    published: Published
    llm: ModelStandIn
    extra: dict[str, Any] = field(default_factory=dict)

    def handlers(self, command: Command) -> Any:
        """The command's handlers, then the after-commit steps (the analysis requests among them)."""
        deps = {"store": self.store, "policy": IncidentPolicy(correlation_window=600), **adapters_off(),
                "analysis": self.analysis, **self.extra}  # fmt: skip
        handlers = bind(with_analysis(HANDLERS), deps)[type(command)]
        return (*handlers, *bind_all(after_commit_steps(enabled=True), deps))

    async def feed(self, type_name: str, data: dict[str, Any], message_id: str) -> None:
        """One message through its handler list, as the dispatcher runs it."""
        message = Message(json.dumps(data).encode(), {TYPE_ATTR: type_name}, message_id)
        command: Command = CommandFactory(with_analysis(HANDLERS)).decode(message)
        ctx = Context(message_id, message.idempotency_key, 1)
        for handler in self.handlers(command):
            await handler(command, ctx)

    async def feed_case(self, case: dict[str, Any], message_id: str = "m-1") -> Incident:
        before = {i.id for i in await self.store.list()}
        await self.feed(case["type"], case["data"], message_id)
        [opened] = [i for i in await self.store.list() if i.id not in before]
        return opened

    async def run_requests(self) -> None:
        """Deliver what the worker published (incident.analyze), oldest first, once each."""
        while self.published.requests:
            body, attributes, message_id = self.published.requests.pop(0)
            await self.feed(attributes[TYPE_ATTR], json.loads(body), message_id)

    async def analyze(self, incident: Incident, message_id: str = "cli-1", **fields: Any) -> None:
        await self.feed(AnalyzeIncident.TYPE, {"incident_id": str(incident.id), **fields}, message_id)

    async def records(self, incident: Incident) -> list[AnalysisRecord]:
        found = await self.store.get(incident.id)
        assert found is not None
        return analyses(found)

    async def entries(self, incident: Incident) -> list[str]:
        found = await self.store.get(incident.id)
        assert found is not None
        return [e.note for e in found.timeline if e.kind == "analysis"]


async def make_world(store: Any, llm: ModelStandIn, **policy: Any) -> AsyncIterator[AiWorld]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    analyst = OpenAIChat(session, base_url=llm.url + "/v1", model="standin-1", api_key=llm.api_key)
    published = Published()
    analysis = Analysis(analyst, RunbookIndex(RUNBOOKS), published, AnalysisPolicy(**policy))
    try:
        yield AiWorld(store, analysis, published, llm)
    finally:
        await analyst.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(tmp_path / "incidents.db")
    yield store
    await store.close()


@pytest.fixture
async def world(store: SqliteStore, llm: ModelStandIn) -> AsyncIterator[AiWorld]:
    async for world in make_world(store, llm, timeout=5.0):
        yield world
