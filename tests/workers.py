"""``python app.py worker`` as a process, the way a pod runs it: settings in ``INCIDENTD_*`` variables,
JSON logs on stderr (into a file), SIGTERM to stop, and the ops server's probes and metrics over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from config.settings import ENV_PREFIX

ROOT = Path(__file__).resolve().parents[1]


def env_of(settings: Mapping[str, object]) -> dict[str, str]:
    """The environment that gives a worker these settings (lists and maps as JSON, as the README says)."""
    return {
        ENV_PREFIX + name.upper(): value if isinstance(value, str) else json.dumps(value)
        for name, value in settings.items()
    }


@contextlib.contextmanager
def worker_process(
    env: Mapping[str, str], log: Path, command: str = "worker"
) -> Iterator[subprocess.Popen[bytes]]:
    """``python app.py worker`` (or ``command``: ``ingest``, ``run``) with ``env`` over this process's
    environment, stdout and stderr appended to ``log``; killed on exit if it is still running (the test
    failed)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py", command], cwd=ROOT, env=os.environ | dict(env), stderr=out, stdout=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def run_app(env: Mapping[str, str], *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """``python app.py ARGS`` to the end (a process of its own: the CLI configures logging
    process-wide); its exit code and its stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "app.py", *args, cwd=ROOT, env=os.environ | dict(env),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def sigterm(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM, and the exit code once the worker has drained (at most ``timeout`` seconds)."""
    process.send_signal(signal.SIGTERM)
    return await exit_code(process, timeout)


async def exit_code(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)


def log_events(log: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``log`` whose ``event`` is ``event``, in order."""
    found = []
    for line in log.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("event") == event:
                found.append(doc)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(5)) as r:
        return r.status, await r.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when it is not there."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None
