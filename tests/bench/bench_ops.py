"""Cost of the ops pieces: the per-message metrics observer, a /metrics render, and the RSS they add.

    python tests/bench/bench_ops.py

Prints numbers; asserts nothing (tests/bench is not collected by pytest).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import timeit
import urllib.request
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402

from application.messages import Message, Outcome  # noqa: E402
from infra.metrics import Metrics  # noqa: E402


def observer_cost() -> None:
    metrics = Metrics(command_types=[f"type.{i}" for i in range(8)])
    message, ack = Message(body=b"{}"), Outcome.ack()
    n = 200_000
    seconds = min(timeit.repeat(lambda: metrics.observe(message, "type.3", ack, 0.012), number=n, repeat=3))
    print(f"observer: {seconds / n * 1e9:.0f} ns per message ({n} calls, best of 3)")
    n = 200
    seconds = min(timeit.repeat(lambda: generate_latest(metrics.registry), number=n, repeat=3))
    size = len(generate_latest(metrics.registry))
    print(f"/metrics render: {seconds / n * 1e6:.0f} us for {size} bytes (8 command types)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(url: str) -> None:
    urllib.request.urlopen(url, timeout=1).close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def worker_rss(ops_enabled: bool) -> tuple[int, float]:
    """RSS of an idle `app.py worker` (embedded broker) and its SIGTERM-to-exit time."""
    port = free_port()
    with TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "INCIDENTD_OPS_ENABLED": str(ops_enabled).lower(),
            "INCIDENTD_OPS_PORT": str(port),
            "INCIDENTD_OPS_HOST": "127.0.0.1",
            "INCIDENTD_SQLITE_PATH": f"{tmp}/db.sqlite",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "app.py", "worker", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            for _ in range(100):
                await asyncio.sleep(0.1)
                if ops_enabled:
                    try:
                        await asyncio.to_thread(ping, f"http://127.0.0.1:{port}/readyz")
                        break
                    except OSError:
                        continue
            await asyncio.sleep(1.0)
            rss = rss_kib(proc.pid)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
            return rss, time.monotonic() - started
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def main() -> None:
    observer_cost()
    for enabled in (False, True):
        rss, stop = asyncio.run(worker_rss(enabled))
        print(f"idle worker, ops_enabled={enabled}: RSS {rss / 1024:.1f} MiB, SIGTERM to exit {stop:.2f} s")


if __name__ == "__main__":
    main()
