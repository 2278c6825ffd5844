"""The ops server as the kubelet and Prometheus see it, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from application.messages import Message, Outcome
from infra.metrics import Metrics
from infra.ops import OpsServer, ReadinessCheck


@asynccontextmanager
async def serving(
    metrics: Metrics | None = None, checks: Mapping[str, ReadinessCheck] | None = None, **options: float
) -> AsyncIterator[tuple[OpsServer, Callable[[str], str]]]:
    metrics = metrics or Metrics()
    server = OpsServer(metrics.registry, host="127.0.0.1", port=0, checks=checks, **options)
    async with server:
        yield server, lambda path: f"http://127.0.0.1:{server.port}{path}"


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def test_healthz_answers_200_while_the_loop_runs() -> None:
    """A running worker is live: /healthz answers 200."""
    async with serving() as (_, url):
        status, body = await get(url("/healthz"))
    assert status == 200, body


async def test_healthz_fails_after_the_event_loop_was_blocked() -> None:
    """A handler that blocks the loop past the threshold makes /healthz answer 503, and it recovers."""
    async with serving(loop_lag_threshold=0.2, watchdog_interval=0.05) as (server, url):
        time.sleep(0.5)  # noqa: ASYNC251 - the point: a synchronous call wedging the worker's loop
        status, body = await get(url("/healthz"))
        assert status == 503, body
        assert "lagging" in body
        for _ in range(100):  # the next watchdog ticks on time again; bounded wait
            await asyncio.sleep(0.05)
            if server.loop_lag() < 0.2:
                break
        status, body = await get(url("/healthz"))
    assert status == 200, body


async def test_readyz_is_200_when_every_check_passes() -> None:
    """Broker connected and store reachable (sync and async checks): the pod is ready."""

    async def ping() -> None:
        return None

    async with serving(checks={"broker": lambda: True, "store": ping}) as (_, url):
        status, body = await get(url("/readyz"))
    assert status == 200, body


async def test_readyz_is_503_naming_the_failing_checks() -> None:
    """A disconnected broker, an unreachable store or a hung check each make the pod not ready."""

    async def store_down() -> None:
        raise ConnectionRefusedError("connection refused")

    async def hangs() -> None:
        await asyncio.sleep(60)

    checks = {"broker": lambda: False, "store": store_down, "slow": hangs, "ok": lambda: True}
    async with serving(checks=checks, check_timeout=0.1) as (_, url):
        status, body = await get(url("/readyz"))
    assert status == 503
    for name in ("broker", "store", "slow"):
        assert f'"{name}"' in body
    assert "connection refused" in body
    assert '"ok"' not in body


async def test_readyz_turns_503_on_mark_stopping_while_healthz_stays_200() -> None:
    """On SIGTERM the pod leaves the endpoints at once but is not killed while it drains."""
    async with serving(checks={"broker": lambda: True}) as (server, url):
        assert (await get(url("/readyz")))[0] == 200
        server.mark_stopping()
        status, body = await get(url("/readyz"))
        assert (status, "stopping" in body) == (503, True)
        assert (await get(url("/healthz")))[0] == 200


async def test_metrics_show_each_outcome_by_command_type() -> None:
    """After ack, retry and dead-letter outcomes, /metrics shows each count and the handler durations."""
    metrics = Metrics(command_types=["alertmanager.webhook"])
    message = Message(body=b"{}")
    metrics.observe(message, "alertmanager.webhook", Outcome.ack(), 0.02)
    metrics.observe(message, "alertmanager.webhook", Outcome.ack(), 0.03)
    metrics.observe(message, "alertmanager.webhook", Outcome.retry(5.0, "timeout"), 1.5)
    metrics.observe(message, "unknown", Outcome.dead_letter("not JSON"), 0.001)
    metrics.track_in_flight(lambda: 3)
    metrics.reconnected()
    metrics.drained(1.25)
    async with serving(metrics) as (_, url):
        status, text = await get(url("/metrics"))
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def messages(command_type: str, outcome: str) -> float:
        return samples[("incidentd_messages_total", (("command_type", command_type), ("outcome", outcome)))]

    assert messages("alertmanager.webhook", "ack") == 2
    assert messages("alertmanager.webhook", "retry") == 1
    assert messages("alertmanager.webhook", "dead_letter") == 0
    assert messages("unknown", "dead_letter") == 1
    count = samples[("incidentd_handler_duration_seconds_count", (("command_type", "alertmanager.webhook"),))]
    total = samples[("incidentd_handler_duration_seconds_sum", (("command_type", "alertmanager.webhook"),))]
    assert (count, round(total, 3)) == (3, 1.55)
    assert samples[("incidentd_messages_in_flight", ())] == 3
    assert samples[("incidentd_broker_reconnects_total", ())] == 1
    assert samples[("incidentd_shutdown_drain_seconds", ())] == 1.25
