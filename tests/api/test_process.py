"""``python app.py run`` as a process, on SQLite and on PostgreSQL: an alert through the ingest becomes an
incident the API lists; acknowledge, note and resolve through the API are applied by the worker, with
the token's name as the actor on the timeline."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.api.conftest import INGEST_TOKEN, TOKENS, WRITE_TOKEN, WRITER, bearer
from tests.incidents.conftest import PG_DSN, drop_schema, postgres_available
from tests.ingest.conftest import eventually
from tests.ingest.processes import app_process

FIXTURE = Path(__file__).parent.parent / "fixtures" / "alertmanager_firing.json"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextlib.contextmanager
def store_env(kind: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    if kind == "sqlite":
        yield {"INCIDENTD_STORE": "sqlite", "INCIDENTD_SQLITE_PATH": str(tmp_path / "incidents.db")}
        return
    postgres_available()
    yield {"INCIDENTD_STORE": "postgres", "INCIDENTD_POSTGRES_DSN": PG_DSN,
           "INCIDENTD_POSTGRES_SCHEMA": f"api_run_{uuid.uuid4().hex[:12]}"}  # fmt: skip


async def call(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        kwargs: dict[str, Any] = {"headers": bearer(token), "timeout": aiohttp.ClientTimeout(20)}
        if isinstance(body, bytes):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        async with session.request(method, url, **kwargs) as response:
            return response.status, await response.json(content_type=None)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_run_lists_the_alert_and_applies_actions_from_the_api(kind: str, tmp_path: Path) -> None:
    """The newcomer's path on the API: alert in, listed; acknowledge / note / resolve out, each applied
    by the worker of the same process, the actor on the timeline being the token's name."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    with store_env(kind, tmp_path) as env:
        try:
            env |= {"INCIDENTD_HTTP_TOKENS_FILE": str(tokens), "INCIDENTD_BROKER": "memory"}
            async with app_process("run", env, tmp_path / "run.log") as running:
                status, _ = await call(
                    "POST", f"{running.http}/v1/alertmanager", INGEST_TOKEN, FIXTURE.read_bytes()
                )
                assert status == 202

                async def listed() -> list[dict[str, Any]]:
                    answer = await call("GET", f"{running.http}/v1/incidents?status=open", WRITE_TOKEN)
                    return (
                        answer[1]["items"] if len(answer[1]["items"]) == 2 else []
                    )  # two alerts, two incidents

                item = (await eventually(listed))[0]
                url = f"{running.http}/v1/incidents/{item['id']}"

                async def timeline(kind: str) -> list[dict[str, Any]]:
                    doc = (await call("GET", url, WRITE_TOKEN))[1]
                    return [e for e in doc["timeline"] if e["kind"] == kind]

                for action, body, entry in (("acknowledge", {}, "acknowledged"),
                                            ("notes", {"note": "rolling back <v42>"}, "note"),
                                            ("resolve", {"note": "fixed"}, "resolved")):  # fmt: skip
                    status, answer = await call("POST", f"{url}/{action}", WRITE_TOKEN, body)
                    assert status == 202, answer
                    (applied,) = await eventually(lambda entry=entry: timeline(entry))
                    assert applied["actor"] == WRITER
                    assert applied["message_id"] == answer["message_id"]
                    assert applied["note"] == body.get("note", "")
                status, doc = await call("GET", url, WRITE_TOKEN)
                assert doc["status"] == "resolved"
                status, history = await call(
                    "GET", f"{running.http}/v1/incidents?status=resolved", WRITE_TOKEN
                )
                assert [i["id"] for i in history["items"]] == [item["id"]]  # the other one is still open
                assert await running.stop() == 0
        finally:
            if kind == "postgres":
                await drop_schema(env["INCIDENTD_POSTGRES_SCHEMA"])


async def test_run_prints_the_dashboard_url(tmp_path: Path) -> None:
    """``app.py run`` says where the dashboard is, and that URL serves it."""
    env = {"INCIDENTD_SQLITE_PATH": str(tmp_path / "incidents.db"), "INCIDENTD_BROKER": "memory"}
    async with app_process("run", env, tmp_path / "run.log") as running:
        said = (tmp_path / "run.log").read_text()
        assert f"incidentd: dashboard on {running.http}/" in said
        async with aiohttp.ClientSession() as session, session.get(f"{running.http}/") as response:
            assert response.status == 200
            assert "Open incidents" in await response.text()
        assert await running.stop() == 0


async def test_serve_and_a_worker_on_rabbitmq_and_postgres(tmp_path: Path) -> None:
    """The production topology: ``app.py serve`` (ingest, API, dashboard) and ``app.py worker`` as two
    processes on RabbitMQ and PostgreSQL. An alert posted to serve becomes an incident the API lists; an
    acknowledge posted to serve is applied by the worker (serve never writes the store); serve's /readyz
    checks the store too."""
    from tests.ingest.conftest import broker_under_test
    from tests.ingest.processes import broker_env
    from tests.workers import get

    postgres_available()
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    schema = f"api_serve_{uuid.uuid4().hex[:12]}"
    store = {
        "INCIDENTD_STORE": "postgres",
        "INCIDENTD_POSTGRES_DSN": PG_DSN,
        "INCIDENTD_POSTGRES_SCHEMA": schema,
    }
    try:
        async with broker_under_test("rabbitmq") as broker:
            env = broker_env(broker.settings) | store
            async with (
                app_process("worker", env, tmp_path / "worker.log"),
                app_process(
                    "serve", env | {"INCIDENTD_HTTP_TOKENS_FILE": str(tokens)}, tmp_path / "serve.log"
                ) as serve,
            ):
                status, body = await get(f"{serve.ops}/readyz")
                assert status == 200 and "store" in body
                body_bytes = FIXTURE.read_bytes()
                assert (await call("POST", f"{serve.http}/v1/alertmanager", INGEST_TOKEN, body_bytes))[
                    0
                ] == 202

                async def listed() -> list[dict[str, Any]]:
                    items = (await call("GET", f"{serve.http}/v1/incidents", WRITE_TOKEN))[1]["items"]
                    return items if len(items) == 2 else []

                first = (await eventually(listed))[0]
                url = f"{serve.http}/v1/incidents/{first['id']}"
                status, answer = await call("POST", f"{url}/acknowledge", WRITE_TOKEN, {"note": "on it"})
                assert status == 202, answer

                async def acknowledged() -> bool:
                    doc = (await call("GET", url, WRITE_TOKEN))[1]
                    return doc["status"] == "acknowledged" and doc["timeline"][-1]["actor"] == WRITER

                await eventually(acknowledged)
    finally:
        await drop_schema(schema)
