"""Fixtures for the incident tests: real payloads, a SQLite store, and a PostgreSQL store in a schema of
its own (unique per test, dropped afterwards) on the server at 127.0.0.1:5432."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from application.commands import AlertmanagerWebhook, AwsEvent, OpsgenieAction
from application.dispatcher import Context
from application.incidents import IncidentPolicy
from infra.sqlite.store import SqliteStore
from tests.services import port_open, require
from tests.standins.noop_actions import adapters_off

FIXTURES = Path(__file__).parent.parent / "fixtures"
PG_DSN = os.environ.get("INCIDENTD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def payload(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def context(message_id: str | None = None) -> Context:
    message_id = message_id or uuid.uuid4().hex
    return Context(message_id=message_id, idempotency_key=message_id, attempt=1)


def alertmanager(name: str = "alertmanager_firing", **changes: Any) -> AlertmanagerWebhook:
    return AlertmanagerWebhook.model_validate({**payload(name), **changes})


def oec(name: str = "oec_create", action: str | None = None, **alert: Any) -> OpsgenieAction:
    data = payload(name)
    data["alert"].update(alert)
    if action:
        data["action"] = action
    return OpsgenieAction.model_validate(data)


def aws(name: str, **detail: Any) -> AwsEvent:
    data = payload(name)
    data["detail"].update(detail)
    return AwsEvent.model_validate(data)


@pytest.fixture
def policy() -> IncidentPolicy:
    return IncidentPolicy(correlation_window=600)


@pytest.fixture
def deps(policy: IncidentPolicy) -> dict[str, Any]:
    return {"policy": policy, **adapters_off()}


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(tmp_path / "incidents.db")
    yield store
    await store.close()


def postgres_available() -> None:
    require(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432", "the CI's .ci/install-incidents.sh")


@pytest.fixture
def pg_schema() -> str:
    return f"incidents_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def postgres_store(pg_schema: str) -> AsyncIterator[Any]:
    postgres_available()
    from infra.postgres.store import PostgresStore

    store = await PostgresStore.open(PG_DSN, schema=pg_schema, min_size=1, max_size=10)
    yield store
    await store.close()
    await drop_schema(pg_schema)


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


Handler = Callable[..., Any]
