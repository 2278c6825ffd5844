"""End to end with a real Alertmanager: its webhooks → ``app.py ingest`` → broker → ``app.py worker`` →
incidents, on RabbitMQ and on the Pub/Sub emulator. The ingest reaches the broker through a TCP proxy,
so the broker's outage is the ingest's alone (the other suites sharing RabbitMQ are not disturbed)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.ingest import alertmanager
from tests.ingest.conftest import TOKEN, broker_under_test, eventually
from tests.ingest.processes import app_process, broker_env, incidents
from tests.proxy import TcpProxy
from tests.workers import get

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WRONG_TOKEN = "wrong-token-never-valid-0123456789"


def alert(
    summary: str, alertname: str, *, via: str = "", ended: bool = False, **labels: str
) -> dict[str, Any]:
    now = datetime.now(UTC)
    labels = {"alertname": alertname, "service": "db", "env": "test", "severity": "critical"} | labels
    if via:
        labels["via"] = via
    doc: dict[str, Any] = {
        "labels": labels,
        "annotations": {"summary": summary},
        "generatorURL": "http://prometheus.test/graph",
        "startsAt": (now - timedelta(minutes=10)).isoformat(),
    }
    if ended:
        doc["endsAt"] = (now - timedelta(minutes=1)).isoformat()
    return doc


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@contextlib.asynccontextmanager
async def ingest_proxy(kind: str):  # type: ignore[no-untyped-def]
    """A TCP proxy in front of the broker, and the environment that points the ingest through it."""
    import os

    if kind == "rabbitmq":
        async with TcpProxy("127.0.0.1", 5672) as proxy:
            yield proxy, {"INCIDENTD_RABBITMQ_URL": proxy.url("amqp://guest:guest@127.0.0.1:5672/")}
        return
    host, _, port = os.environ["PUBSUB_EMULATOR_HOST"].rpartition(":")
    async with TcpProxy(host, int(port)) as proxy:
        yield proxy, {"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{proxy.port}"}


async def test_alertmanager_alerts_become_incidents_and_none_is_lost(
    broker_kind: str, tmp_path: Path
) -> None:
    """Alerts posted to Alertmanager become open incidents; posted again with endsAt in the past they
    resolve; through a receiver with a wrong token nothing is published and the ingest counts the 401s;
    with the broker cut off mid-test the ingest answers 503, Alertmanager retries, and once the broker is
    back every alert is an incident; the ingest's /readyz is 503 while the broker is unreachable. No token
    appears in the ingest's log."""
    db = tmp_path / "incidents.db"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alertmanager:{TOKEN}:ingest\n")
    async with (
        broker_under_test(broker_kind) as broker,
        ingest_proxy(broker_kind) as (proxy, through_proxy),
    ):
        env = broker_env(broker.settings) | {"INCIDENTD_STORE": "sqlite", "INCIDENTD_SQLITE_PATH": str(db)}
        ingest_env = env | through_proxy | {
            "INCIDENTD_HTTP_TOKENS_FILE": str(tokens), "INCIDENTD_HTTP_PUBLISH_TIMEOUT": "2",
        }  # fmt: skip
        async with (
            app_process("worker", env, tmp_path / "worker.log") as worker,
            app_process("ingest", ingest_env, tmp_path / "ingest.log") as ingest,
            alertmanager.running(
                tmp_path / "am", f"{ingest.http}/v1/alertmanager", {"incidentd": TOKEN, "wrong": WRONG_TOKEN}
            ) as am,
        ):
            firing = [alert(f"Disk full on db-{i}", "DiskFull", instance=f"db-{i}") for i in range(3)]
            await alertmanager.post_alerts(am, firing)
            expected = {a["annotations"]["summary"]: "open" for a in firing}
            await eventually(lambda: incidents(db) == expected, timeout=90)

            resolved = [
                alert(f"Disk full on db-{i}", "DiskFull", instance=f"db-{i}", ended=True) for i in range(3)
            ]
            await alertmanager.post_alerts(am, resolved)
            expected = {title: "resolved" for title in expected}
            await eventually(lambda: incidents(db) == expected, timeout=90)

            await alertmanager.post_alerts(am, [alert("Sent with a wrong token", "WrongToken", via="wrong")])

            async def unauthorized() -> bool:
                return await ingest.metric("incidentd_http_rejected_total", reason="unauthorized") >= 1

            await eventually(unauthorized, timeout=90)
            assert (
                await ingest.metric("incidentd_http_requests_total", endpoint="alertmanager", status="401")
                >= 1
            )
            assert "Sent with a wrong token" not in incidents(db)

            during = [alert(f"Alert during the outage {i}", "Outage", instance=f"x-{i}") for i in range(3)]
            async with proxy.outage():
                await alertmanager.post_alerts(am, during)

                async def refused() -> bool:
                    return (
                        await ingest.metric("incidentd_http_rejected_total", reason="broker-unavailable") >= 1
                    )

                await eventually(refused, timeout=90)
                assert not any(title.startswith("Alert during") for title in incidents(db))

                async def readiness() -> int:
                    return (await get(f"{ingest.ops}/readyz"))[0]

                await eventually(lambda: _is(readiness(), 503), timeout=60)
            expected |= {a["annotations"]["summary"]: "open" for a in during}
            await eventually(lambda: incidents(db) == expected, timeout=120)
            await eventually(lambda: _is(readiness(), 200), timeout=60)

            assert await ingest.stop() == 0
            assert await worker.stop() == 0
            log = (tmp_path / "ingest.log").read_text()
            assert TOKEN not in log and WRONG_TOKEN not in log
            assert "http.listening" in log
