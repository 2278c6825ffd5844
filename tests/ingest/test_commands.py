"""``app.py ingest`` and ``app.py run`` as processes: when they refuse to start, the all-in-one quick
start, SIGTERM with requests in flight, and the tokens file re-read on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import FIXTURES, fixture_json
from tests.ingest.conftest import TOKEN, bearer, broker_under_test, eventually
from tests.ingest.processes import app_process, broker_env, incidents
from tests.proxy import TcpProxy
from tests.workers import get, run_app

pytestmark = pytest.mark.integration


async def test_ingest_on_a_real_broker_refuses_to_start_without_tokens() -> None:
    """No tokens file and no INCIDENTD_HTTP_AUTH=none: `ingest` exits 2 with one line saying what to set."""
    code, out = await run_app({"INCIDENTD_BROKER": "rabbitmq"}, "ingest")
    assert code == 2
    assert out.strip().count("\n") == 0
    assert "INCIDENTD_HTTP_TOKENS_FILE" in out and "INCIDENTD_HTTP_AUTH=none" in out


async def test_ingest_refuses_a_broken_tokens_file_naming_the_line_not_the_token(tmp_path: Path) -> None:
    """A tokens file with a bad line stops `ingest` at start-up: exit 2, one line with the line number,
    and the secret on that line is not printed."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alertmanager:{TOKEN}\nbroken:short-secret\n")
    code, out = await run_app(
        {"INCIDENTD_BROKER": "rabbitmq", "INCIDENTD_HTTP_TOKENS_FILE": str(tokens)}, "ingest"
    )
    assert code == 2 and out.strip().count("\n") == 0
    assert "line 2 (broken)" in out and "short-secret" not in out and TOKEN not in out


async def test_run_refuses_a_non_loopback_address_without_tokens(tmp_path: Path) -> None:
    """`run` bound to 0.0.0.0 without a tokens file exits 2 with one line; nothing is served."""
    env = {"INCIDENTD_HTTP_HOST": "0.0.0.0", "INCIDENTD_SQLITE_PATH": str(tmp_path / "db")}
    code, out = await run_app(env, "run")
    assert code == 2 and "non-loopback address 0.0.0.0" in out


async def test_run_serves_the_quick_start_on_loopback(tmp_path: Path) -> None:
    """The README's second step: `app.py run` on the embedded default serves without auth on loopback
    (and says so); curl-ing the Alertmanager fixture opens its incidents; SIGTERM exits 0."""
    db = tmp_path / "incidentd.db"
    async with app_process("run", {"INCIDENTD_SQLITE_PATH": str(db)}, tmp_path / "run.log") as run:
        body = (FIXTURES / "alertmanager_firing.json").read_bytes()
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{run.http}/v1/alertmanager", data=body) as response,
        ):
            assert response.status == 202
        titles = {a["annotations"]["summary"] for a in fixture_json("alertmanager_firing")["alerts"]}
        await eventually(lambda: set(incidents(db)) == titles)
        assert await run.stop() == 0
    log = (tmp_path / "run.log").read_text()
    assert "no authentication: embedded broker, bound to loopback 127.0.0.1" in log
    code, out = await run_app({"INCIDENTD_SQLITE_PATH": str(db)}, "incidents", "list")
    assert code == 0 and all(title in out for title in titles)


class Watching(TcpProxy):
    """A proxy that also notes the bytes going to the broker, to see when a publish is on its way."""

    sent = b""

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        read = reader.read

        async def noting(n: int = -1) -> bytes:
            data = await read(n)
            self.sent += data
            return data

        reader.read = noting  # type: ignore[method-assign]
        await super()._pipe(reader, writer)


async def test_sigterm_answers_every_request_in_flight(broker_kind: str, tmp_path: Path) -> None:
    """SIGTERM while 10 requests wait for their confirms (the broker answers 1.5 s late): /readyz turns
    503, each request still gets its 202 (no 2xx before its confirm: every message is on the broker),
    and the process exits 0."""
    import os

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alertmanager:{TOKEN}\n")
    async with broker_under_test(broker_kind) as broker:
        if broker_kind == "rabbitmq":
            target = ("127.0.0.1", 5672)
        else:
            host, _, port = os.environ["PUBSUB_EMULATOR_HOST"].rpartition(":")
            target = (host, int(port))
        async with Watching(*target) as proxy:
            via = (
                {"INCIDENTD_RABBITMQ_URL": proxy.url(broker.settings.rabbitmq_url)}
                if broker_kind == "rabbitmq"
                else {"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{proxy.port}"}
            )
            env = broker_env(broker.settings) | via | {"INCIDENTD_HTTP_TOKENS_FILE": str(tokens)}
            async with app_process("ingest", env, tmp_path / "ingest.log") as ingest:
                proxy.delay = 1.5
                bodies = [
                    json.dumps(
                        {"title": f"in flight {i}", "dedup_key": f"marker-{i:02d}-{broker_kind}"}
                    ).encode()
                    for i in range(10)
                ]
                async with aiohttp.ClientSession() as session:

                    async def send(body: bytes) -> tuple[int, str]:
                        url = f"{ingest.http}/v1/commands/incident.create"
                        async with session.post(url, data=body, headers=bearer()) as response:
                            return response.status, (await response.json()).get("message_id", "")

                    requests = [asyncio.create_task(send(b)) for b in bodies]
                    markers = [f"marker-{i:02d}".encode() for i in range(10)]
                    await eventually(lambda: all(m in proxy.sent for m in markers), timeout=60, interval=0.02)
                    ingest.process.send_signal(signal.SIGTERM)

                    async def not_ready() -> bool:
                        return (await get(f"{ingest.ops}/readyz"))[0] == 503

                    await eventually(not_ready, timeout=30, interval=0.05)
                    assert not any(r.done() for r in requests)
                    answers = await asyncio.gather(*requests)
                assert [status for status, _ in answers] == [202] * 10
                assert await ingest.stop() == 0
        published = {p.message_id for p in await broker.published()}
        assert {message_id for _, message_id in answers} <= published


async def test_sighup_reloads_the_tokens_file(tmp_path: Path) -> None:
    """A token added to the file works after SIGHUP (the periodic check is off here: an hour); a removed
    one stops working."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alertmanager:{TOKEN}\n")
    new = "added-later-0123456789abcdef"
    env = {"INCIDENTD_SQLITE_PATH": str(tmp_path / "db"), "INCIDENTD_HTTP_TOKENS_FILE": str(tokens),
           "INCIDENTD_HTTP_TOKENS_RELOAD_INTERVAL": "3600"}  # fmt: skip
    async with app_process("run", env, tmp_path / "run.log") as run, aiohttp.ClientSession() as session:
        body = json.dumps({"title": "via a new token"}).encode()

        async def status(token: str) -> int:
            url = f"{run.http}/v1/commands/incident.create"
            async with session.post(url, data=body, headers=bearer(token)) as response:
                return response.status

        assert await status(new) == 401
        tokens.write_text(f"later:{new}\n")
        run.process.send_signal(signal.SIGHUP)

        async def accepted() -> bool:
            return await status(new) == 202

        await eventually(accepted, timeout=30)
        assert await status(TOKEN) == 401
        assert await run.stop() == 0
