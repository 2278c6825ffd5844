"""A real Alertmanager (Debian's prometheus-alertmanager, 0.25; ``.ci/install-ingest.sh``) for the
end-to-end tests: started on a free loopback port with a generated config whose webhook receivers post
to the ingest with a bearer token (``http_config.authorization``), clustering off, short group timers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.services import require
from tests.workers import free_port

BINARIES = ("prometheus-alertmanager", "alertmanager")


def binary() -> str:
    found = next((path for name in BINARIES if (path := shutil.which(name))), None)
    require(found is not None, "Alertmanager (prometheus-alertmanager)", "bash .ci/install-ingest.sh")
    assert found is not None
    return found


def config(webhook_url: str, tokens: Mapping[str, str]) -> dict[str, Any]:
    """One webhook receiver per entry of ``tokens`` (receiver name -> bearer token); an alert goes to the
    receiver its ``via`` label names, else to the first one. Groups by alertname, flushed within ~1 s."""
    names = list(tokens)
    receivers = [
        {
            "name": name,
            "webhook_configs": [
                {
                    "url": webhook_url,
                    "send_resolved": True,
                    "http_config": {"authorization": {"type": "Bearer", "credentials": token}},
                }
            ],
        }
        for name, token in tokens.items()
    ]
    return {
        "route": {
            "receiver": names[0],
            "group_by": ["alertname", "via"],
            "group_wait": "500ms",
            "group_interval": "1s",
            "repeat_interval": "1h",
            "routes": [{"receiver": name, "matchers": [f'via="{name}"']} for name in names[1:]],
        },
        "receivers": receivers,
    }


def start(tmp: Path, webhook_url: str, tokens: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start Alertmanager with its config, data and log (``alertmanager.log``) in ``tmp``."""
    executable = binary()
    tmp.mkdir(parents=True, exist_ok=True)
    config_file = tmp / "alertmanager.yml"
    config_file.write_text(json.dumps(config(webhook_url, tokens)))  # YAML is a superset of JSON
    port = free_port()
    with (tmp / "alertmanager.log").open("ab") as log:
        process = subprocess.Popen(
            [executable, f"--config.file={config_file}", f"--storage.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=debug"],
            stdout=log, stderr=log,
        )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def running(tmp: Path, webhook_url: str, tokens: Mapping[str, str]) -> AsyncIterator[str]:
    """Alertmanager's base URL (``http://127.0.0.1:PORT``) while it runs."""
    process, url = start(tmp, webhook_url, tokens)
    try:
        await _wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), 20)
        except TimeoutError:
            process.kill()
            process.wait()


async def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            assert process.poll() is None, "alertmanager exited; see its log"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/-/ready", timeout=aiohttp.ClientTimeout(2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise AssertionError("alertmanager did not become ready within 60 s")


async def post_alerts(url: str, alerts: list[dict[str, Any]]) -> None:
    """``POST /api/v2/alerts``, as Prometheus does."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/api/v2/alerts", json=alerts) as response,
    ):
        assert response.status == 200, await response.text()
