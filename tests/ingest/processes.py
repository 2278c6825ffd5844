"""``app.py worker`` and ``app.py ingest`` as processes on one broker, the way pods run them, and what
their SQLite store and /metrics show."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from tests.ingest.conftest import eventually
from tests.workers import env_of, free_port, get, sample, sigterm, worker_process


def broker_env(settings: Settings) -> dict[str, str]:
    """The INCIDENTD_* variables naming this test's broker and topology."""
    return env_of(settings.model_dump(mode="json", exclude_defaults=True))


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    ops: str  # http://127.0.0.1:PORT of the ops server
    log: Path
    http: str = ""  # http://127.0.0.1:PORT of the ingest (ingest and run only)

    async def metric(self, name: str, **labels: str) -> float:
        status, text = await get(f"{self.ops}/metrics")
        assert status == 200
        return sample(text, name, **labels) or 0.0

    async def stop(self) -> int:
        return await sigterm(self.process)


@contextlib.asynccontextmanager
async def app_process(command: str, env: Mapping[str, str], log: Path):  # type: ignore[no-untyped-def]
    """``app.py COMMAND`` with ``env``; yields once its /readyz answers 200."""
    ops_port, http_port = free_port(), free_port()
    env = {"INCIDENTD_OPS_HOST": "127.0.0.1", "INCIDENTD_OPS_PORT": str(ops_port),
           "INCIDENTD_HTTP_HOST": "127.0.0.1", "INCIDENTD_HTTP_PORT": str(http_port)} | dict(env)  # fmt: skip
    with worker_process(env, log, command) as process:
        running = Running(process, f"http://127.0.0.1:{ops_port}", log, f"http://127.0.0.1:{http_port}")

        async def ready() -> bool:
            assert process.poll() is None, f"{command} exited; see {log}"
            with contextlib.suppress(OSError):
                return (await get(f"{running.ops}/readyz"))[0] == 200
            return False

        await eventually(ready, timeout=90, interval=0.2)
        yield running


def incidents(db: Path) -> dict[str, str]:
    """Title -> status of every incident in the worker's SQLite store."""
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            rows = conn.execute("SELECT status, doc FROM incidents").fetchall()
        except sqlite3.OperationalError:  # schema not created yet, or busy
            return {}
    return {json.loads(doc)["title"]: status for status, doc in rows}


def lines(log: Path) -> Iterator[str]:
    yield from log.read_text(errors="replace").splitlines()
