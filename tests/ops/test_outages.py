"""A worker whose broker or store does not answer at start-up waits, says so once per attempt, reports
not-ready (but alive) meanwhile, and then either recovers or exits 1 with one line.

The servers are the real RabbitMQ and PostgreSQL, reached through a loopback proxy (tests/proxy.py) whose
``outage()`` refuses connections, so nothing machine-wide is stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from config.settings import Settings
from tests.contract.broker_contract import eventually
from tests.incidents.conftest import PG_DSN, drop_schema, pg_schema, postgres_available  # noqa: F401
from tests.proxy import proxy_for
from tests.rabbitmq.conftest import rabbitmq, settings  # noqa: F401 - fixtures
from tests.workers import env_of, exit_code, free_port, get, sigterm, worker_process


def json_lines(log: Path) -> list[dict[str, Any]]:
    """Every line of the worker's stderr, each parsed as one JSON object (fails on any other line)."""
    lines = log.read_text().splitlines()
    assert lines, "the worker wrote nothing"
    parsed = []
    for line in lines:
        doc = json.loads(line)
        assert isinstance(doc, dict), line
        parsed.append(doc)
    return parsed


async def status(url: str) -> int:
    try:
        return (await get(url))[0]
    except aiohttp.ClientError:
        return 0


async def test_unreachable_broker_waits_not_ready_then_exits_1_with_one_line(
    settings: Settings,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """RabbitMQ refuses every connection: the worker logs one `startup.waiting` line per attempt (the
    URL's password masked), /healthz is 200 and /readyz 503 while it waits, and after
    INCIDENTD_STARTUP_TIMEOUT it exits 1 with one `command.failed` line; no traceback, no non-JSON line."""
    port, log = free_port(), tmp_path / "worker.log"
    url = settings.rabbitmq_url.replace("guest:guest@", "guest:s3cret-pw@")
    async with proxy_for(url, 5672) as link, link.outage():
        env = env_of({
            "broker": "rabbitmq", "rabbitmq_url": link.url(url), "rabbitmq_queue": settings.rabbitmq_queue,
            "rabbitmq_exchange": settings.rabbitmq_exchange, "sqlite_path": str(tmp_path / "incidentd.db"),
            "ops_host": "127.0.0.1", "ops_port": port, "startup_timeout": 6,
        })  # fmt: skip
        with worker_process(env, log) as worker:
            ops = f"http://127.0.0.1:{port}"
            await eventually(lambda: _is(status(ops + "/healthz"), 200), timeout=30)
            assert await status(ops + "/readyz") == 503
            assert worker.poll() is None
            assert await exit_code(worker, 60) == 1
    events = json_lines(log)
    waiting = [e for e in events if e["event"] == "startup.waiting"]
    assert len(waiting) >= 2 and [e["attempt"] for e in waiting] == list(range(1, len(waiting) + 1))
    assert all(e["service"] == "broker" and ":***@127.0.0.1" in e["target"] for e in waiting)
    [failed] = [e for e in events if e["level"] == "error"]
    assert failed["event"] == "command.failed" and "cannot connect to the broker" in failed["error"]
    assert "exception" not in failed
    assert "s3cret-pw" not in log.read_text()
    assert events[0]["event"] == "worker.starting"


async def test_broker_that_comes_back_during_the_wait_is_used(
    settings: Settings,  # noqa: F811
    tmp_path: Path,
) -> None:
    """RabbitMQ refuses connections for the first attempts, then answers: the same worker process
    connects, turns ready, and exits 0 on SIGTERM."""
    port, log = free_port(), tmp_path / "worker.log"
    async with proxy_for(settings.rabbitmq_url, 5672) as link:
        env = env_of({
            "broker": "rabbitmq", "rabbitmq_url": link.url(settings.rabbitmq_url),
            "rabbitmq_queue": settings.rabbitmq_queue, "rabbitmq_exchange": settings.rabbitmq_exchange,
            "retry_backoff": settings.retry_backoff, "sqlite_path": str(tmp_path / "incidentd.db"),
            "ops_host": "127.0.0.1", "ops_port": port, "startup_timeout": 120,
        })  # fmt: skip
        with worker_process(env, log) as worker:
            ops = f"http://127.0.0.1:{port}"
            async with link.outage():
                await eventually(lambda: len(_waiting(log)) >= 2, timeout=60)
                assert await status(ops + "/readyz") == 503
                assert await status(ops + "/healthz") == 200
            await eventually(lambda: _is(status(ops + "/readyz"), 200), timeout=60)
            assert await sigterm(worker) == 0, log.read_text()[-3000:]
    events = json_lines(log)
    assert any(e["event"] == "startup.connected" and e["service"] == "broker" for e in events)


async def test_store_that_comes_back_during_the_wait_is_used(tmp_path: Path, pg_schema: str) -> None:  # noqa: F811
    """PostgreSQL refuses connections at start-up: the worker waits (not ready, alive), then connects
    once the database answers; its /readyz turns 200."""
    postgres_available()
    port, log = free_port(), tmp_path / "worker.log"
    try:
        async with proxy_for(PG_DSN, 5432) as link:
            env = env_of({
                "store": "postgres", "postgres_dsn": link.url(PG_DSN), "postgres_schema": pg_schema,
                "sqlite_path": str(tmp_path / "incidentd.db"), "ops_host": "127.0.0.1", "ops_port": port,
                "startup_timeout": 120,
            })  # fmt: skip
            with worker_process(env, log) as worker:
                ops = f"http://127.0.0.1:{port}"
                async with link.outage():
                    await eventually(lambda: len(_waiting(log)) >= 2, timeout=60)
                    assert await status(ops + "/readyz") == 503
                    assert await status(ops + "/healthz") == 200
                await eventually(lambda: _is(status(ops + "/readyz"), 200), timeout=60)
                assert await sigterm(worker) == 0, log.read_text()[-3000:]
    finally:
        await drop_schema(pg_schema)
    assert {e["service"] for e in _waiting(log)} == {"store"}
    json_lines(log)


def _waiting(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "startup.waiting":
            found.append(doc)
    return found


async def _is(value: Any, expected: object) -> bool:
    return await value == expected  # type: ignore[no-any-return]


async def test_a_postgresql_outage_while_processing_is_retried_without_a_traceback_per_message(
    settings: Settings,  # noqa: F811
    tmp_path: Path,
    pg_schema: str,  # noqa: F811
) -> None:
    """PostgreSQL goes away while 40 incident.create messages arrive: each failure is a TransientError
    ("PostgreSQL unavailable: ..."; retried in-process, then redelivered), never an unexpected error with
    a traceback; identical retry lines are held back (a later one says how many with `repeated`), so
    the log has far fewer lines than failed deliveries; once the database is back every message becomes
    its incident, and stderr stayed one JSON object per line."""
    import asyncpg

    from infra.rabbitmq import open_broker

    postgres_available()
    log, count = tmp_path / "worker.log", 40
    try:
        async with proxy_for(PG_DSN, 5432) as link:
            env = env_of({
                "broker": "rabbitmq", "rabbitmq_url": settings.rabbitmq_url,
                "rabbitmq_queue": settings.rabbitmq_queue, "rabbitmq_exchange": settings.rabbitmq_exchange,
                "retry_backoff": [0.5], "max_attempts": 100, "store": "postgres",
                "postgres_dsn": link.url(PG_DSN), "postgres_schema": pg_schema, "ops_enabled": False,
                "log_repeat_window": 1, "sqlite_path": str(tmp_path / "incidentd.db"),
            })  # fmt: skip
            with worker_process(env, log) as worker:
                await eventually(lambda: "worker.started" in log.read_text(), timeout=60)
                async with open_broker(settings) as broker, link.outage():
                    for n in range(count):
                        body = json.dumps({"title": f"outage {n}", "dedup_key": f"outage-{n}"}).encode()
                        await broker.publisher.publish(body, {"type": "incident.create"})
                    # Until a retry line, a window after an identical one, counts those held back.
                    await eventually(
                        lambda: any(e.get("repeated", 0) > 0 for e in _retry_lines(log)), timeout=60
                    )
                conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
                try:

                    async def all_stored() -> bool:
                        return await conn.fetchval("SELECT count(*) FROM incidents") == count  # type: ignore[no-any-return]

                    await eventually(all_stored, timeout=90)
                finally:
                    await conn.close()
                assert await sigterm(worker) == 0, log.read_text()[-3000:]
    finally:
        await drop_schema(pg_schema)
    events = json_lines(log)
    # asyncpg's pool may log its own reconnection failure with a traceback (once per window, held back
    # like any repeated line); incidentd logs none, and none per message.
    tracebacks = [e for e in events if "exception" in e]
    assert len(tracebacks) < 10 and all(e.get("logger", "").startswith("asyncpg") for e in tracebacks)
    assert not [e for e in events if e["event"] == "handler.unexpected_error"]
    retries = [e for e in events if e["event"] == "message.retry"]
    assert retries and all(e["reason"].startswith("PostgreSQL unavailable: ") for e in retries)
    assert len([e for e in events if e["level"] in ("warning", "error")]) < count
    assert any(e.get("repeated", 0) > 0 for e in retries)


def _retry_lines(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "message.retry":
            found.append(doc)
    return found
