"""The incident API and the pages on the real application (make_app) over HTTP, on both stores.

``api`` serves the application on a loopback port with a store of each kind (SQLite in a temporary
file; PostgreSQL in a schema of its own, dropped afterwards) and the embedded broker's queue, so a test
reads back what an action published. Incidents are seeded through the store's own transactions, as the
worker writes them.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import Incident
from application.messages import Message
from infra.memory.broker import MemoryPublisher, MemoryQueue
from infra.web.app import HttpDeps, make_app
from infra.web.auth import RateLimiter, Tokens
from infra.web.metrics import HttpMetrics
from tests.incidents.conftest import PG_DSN, drop_schema, postgres_available

WRITER, WRITE_TOKEN = "oncall-alice", "write-token-0123456789abcdef"
READER, READ_TOKEN = "viewer", "read-token-0123456789abcdef0"
INGEST_TOKEN = "ingest-token-0123456789abcdef"
TOKENS = (
    f"{WRITER}:{WRITE_TOKEN}:read,write\n{READER}:{READ_TOKEN}:read\nalertmanager:{INGEST_TOKEN}:ingest\n"
)
STORES = ["sqlite", "postgres"]
NOW = datetime.now(UTC).replace(microsecond=0)

Client = TestClient[aiohttp.web.Request, aiohttp.web.Application]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def incident(
    title: str = "Checkout 5xx above 5%",
    *,
    at: datetime | None = None,
    service: str = "checkout",
    environment: str = "production",
    severity: str = "high",
    acknowledged: timedelta | None = None,
    resolved: timedelta | None = None,
    group: str = "",
    **fields: Any,
) -> Incident:
    """An incident opened at ``at`` (acknowledged / resolved that long after, when given)."""
    at = at or NOW
    made = Incident.open(
        at=at, actor="test", message_id=uuid.uuid4().hex, title=title, service=service,
        environment=environment, severity=severity, source="manual", dedup_key=uuid.uuid4().hex, **fields,
    )  # fmt: skip
    made.correlation_group = group or str(made.id)
    if acknowledged is not None:
        made.acknowledge(at=at + acknowledged, actor="someone", message_id=uuid.uuid4().hex)
    if resolved is not None:
        made.resolve(at=at + resolved, actor="someone", message_id=uuid.uuid4().hex)
    return made


async def seed(store: Any, *incidents: Incident) -> list[Incident]:
    """Write these incidents the way the worker does (a transaction each)."""
    for one in incidents:
        async with store.transaction(f"seed-{one.id}") as tx:
            await tx.add(one)
    return list(incidents)


@contextlib.asynccontextmanager
async def open_store(kind: str, tmp_path: Path) -> AsyncIterator[Any]:
    if kind == "sqlite":
        from infra.sqlite.store import SqliteStore

        store = await SqliteStore.open(tmp_path / "incidents.db")
        try:
            yield store
        finally:
            await store.close()
        return
    postgres_available()
    from infra.postgres.store import PostgresStore

    schema = f"api_test_{uuid.uuid4().hex[:12]}"
    store = await PostgresStore.open(PG_DSN, schema=schema, min_size=1, max_size=4)
    try:
        yield store
    finally:
        await store.close()
        await drop_schema(schema)


@dataclass
class Api:
    client: Client
    store: Any
    queue: MemoryQueue

    def published(self) -> list[Message]:
        """What the application published so far (taken off the embedded broker's queue)."""
        found = []
        while not self.queue.ready.empty():
            found.append(self.queue.ready.get_nowait())
        return found


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    return path


@contextlib.asynccontextmanager
async def serving(store: Any, tokens: Path | None) -> AsyncIterator[Api]:
    queue = MemoryQueue()
    deps = HttpDeps(
        publisher=MemoryPublisher(queue), factory=CommandFactory(HANDLERS),
        metrics=HttpMetrics(CollectorRegistry()), tokens=Tokens.load(tokens) if tokens else None,
        limiter=RateLimiter(0, 1), store=store,
    )  # fmt: skip
    async with TestClient(TestServer(make_app(deps), host="127.0.0.1")) as client:
        yield Api(client, store, queue)


@pytest.fixture
async def api(store_kind: str, tmp_path: Path, tokens_file: Path) -> AsyncIterator[Api]:
    async with open_store(store_kind, tmp_path) as store, serving(store, tokens_file) as served:
        yield served
