"""What the ops server shows when a worker's broker connection drops and comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from config.settings import Settings
from tests.contract.broker_contract import eventually
from tests.proxy import proxy_for
from tests.rabbitmq.conftest import rabbitmq, settings  # noqa: F401 - fixtures
from tests.workers import env_of, free_port, get, sample, sigterm, worker_process


async def test_a_dropped_rabbitmq_connection_is_counted_and_readiness_recovers(
    settings: Settings,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """`python app.py worker` reaches RabbitMQ through a proxy, which then drops the connection and
    cuts new ones for a second: /readyz turns 503 and no reconnect is counted yet; once the path is
    back, the worker reconnects on its own, incidentd_broker_reconnects_total is 1 (failed attempts do
    not count), /readyz is 200 again, and SIGTERM still exits 0."""
    port, log = free_port(), tmp_path / "worker.log"
    async with proxy_for(settings.rabbitmq_url, 5672) as link:
        env = env_of({
            "broker": "rabbitmq", "rabbitmq_url": link.url(settings.rabbitmq_url) + "?reconnect_interval=0.5",
            "rabbitmq_exchange": settings.rabbitmq_exchange, "rabbitmq_queue": settings.rabbitmq_queue,
            "retry_backoff": settings.retry_backoff, "sqlite_path": str(tmp_path / "incidentd.db"),
            "ops_host": "127.0.0.1", "ops_port": port, "log_level": "warning",
        })  # fmt: skip
        with worker_process(env, log) as worker:
            url = f"http://127.0.0.1:{port}"

            async def readiness() -> int:
                assert worker.poll() is None, log.read_text()[-3000:]
                try:
                    return (await get(url + "/readyz"))[0]
                except aiohttp.ClientError:
                    return 0

            async def reconnects() -> float | None:
                return sample((await get(url + "/metrics"))[1], "incidentd_broker_reconnects_total")

            await eventually(lambda: _is(readiness(), 200), timeout=60)
            assert await reconnects() == 0
            async with link.outage():  # connection dropped, reconnection attempts cut off
                await eventually(lambda: _is(readiness(), 503), timeout=10)
                await asyncio.sleep(1)  # a few failed attempts (reconnect_interval=0.5)
                assert await reconnects() == 0
            await eventually(lambda: _is(reconnects(), 1), timeout=30)
            await eventually(lambda: _is(readiness(), 200), timeout=10)
            assert await sigterm(worker) == 0, log.read_text()[-3000:]
    assert "rabbitmq.reconnected" in log.read_text()


async def _is(value: object, expected: object) -> bool:
    return await value == expected  # type: ignore[misc]
