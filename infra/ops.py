"""The ops HTTP server: liveness, readiness and Prometheus metrics for Kubernetes.

It runs on the worker's own event loop on purpose: if a handler blocks the loop, ``/healthz`` stops
answering (or reports the lag the watchdog saw) and the kubelet restarts the pod. ``/readyz`` turns 503
the moment :meth:`OpsServer.mark_stopping` is called (on SIGTERM, before the drain starts), so a rollout
sees the pod leave at once; ``/healthz`` stays 200 while it drains, so the kubelet does not kill it early.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# A readiness check is a callable returning a bool or an awaitable (e.g. ``lambda: subscriber.connected``
# or ``store.ping``). It fails when it returns False, raises, or takes longer than the check timeout.
ReadinessCheck = Callable[[], Any]


class OpsServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        checks: Mapping[str, ReadinessCheck] | None = None,
        loop_lag_threshold: float = 10.0,
        check_timeout: float = 2.0,
        watchdog_interval: float = 1.0,
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._checks = dict(checks or {})
        self._lag_threshold = loop_lag_threshold
        self._check_timeout = check_timeout
        self._interval = watchdog_interval
        self._on_lag = on_lag
        self._stopping = False
        self._lag = 0.0
        self._last_tick = 0.0
        self._runner: web.AppRunner | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port actually bound (differs from the configured one when that was 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the ops server is not running")
        return int(self._runner.addresses[0][1])

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def remove_check(self, name: str) -> None:
        """Drop a check (e.g. the worker's ``startup`` check once the broker and store answered)."""
        self._checks.pop(name, None)

    def mark_stopping(self) -> None:
        """Report not-ready from now on; the worker calls this first thing on SIGTERM."""
        self._stopping = True

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # No access log: the kubelet probes every few seconds and would drown the worker's own lines.
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self._last_tick = asyncio.get_running_loop().time()
        self._watchdog = asyncio.create_task(self._watch_loop(), name="ops-loop-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def loop_lag(self) -> float:
        """The worst of: how late the last watchdog tick ran, and how overdue the next one is now."""
        overdue = asyncio.get_running_loop().time() - self._last_tick - self._interval
        return max(self._lag, overdue, 0.0)

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            self._last_tick = loop.time()
            self._lag = max(self._last_tick - expected, 0.0)
            if self._on_lag is not None:
                self._on_lag(self._lag)

    async def _healthz(self, request: web.Request) -> web.Response:
        lag = self.loop_lag()
        if lag > self._lag_threshold:
            return web.json_response(
                {"status": "event loop lagging", "lag_seconds": round(lag, 3)}, status=503
            )
        return web.json_response({"status": "ok", "lag_seconds": round(lag, 3)})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._stopping:
            return web.json_response({"status": "stopping"}, status=503)
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_check(self._checks[name]) for name in names))
        failed = {name: problem for name, problem in zip(names, results, strict=True) if problem}
        if failed:
            return web.json_response({"status": "not ready", "failed": failed}, status=503)
        return web.json_response({"status": "ready", "checks": names})

    async def _run_check(self, check: ReadinessCheck) -> str | None:
        """None when the check passes, else a short description of why it did not."""
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self._check_timeout)
        except TimeoutError:
            return f"no answer within {self._check_timeout:g}s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "not ready" if result is False else None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
