"""Abuse limits of the ingest, on RabbitMQ and on the Pub/Sub emulator: headers that trickle in
(slowloris) lose their connection after the read timeout, and a peer address that keeps failing to
authenticate is answered 429 for a while, without learning which part of its credentials was wrong."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from application.handlers import HANDLERS
from infra.web.app import make_app
from infra.web.auth import Tokens
from infra.web.server import HttpServer, build_deps
from tests.conftest import fixture_json
from tests.ingest.conftest import TOKEN, BrokerUnderTest, bearer

pytestmark = pytest.mark.integration

BODY = json.dumps(fixture_json("alertmanager_firing")).encode()


@asynccontextmanager
async def listening(broker: BrokerUnderTest, tokens: Path, **overrides: Any) -> AsyncIterator[HttpServer]:
    """The application as `ingest` serves it (HttpServer: aiohttp's connection handling included)."""
    settings = broker.settings.model_copy(update=overrides)
    deps = build_deps(settings, broker.broker, CollectorRegistry(), Tokens.load(tokens), HANDLERS)
    server = HttpServer(make_app(deps), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def post(port: int, headers: dict[str, str], source: str = "127.0.0.1") -> tuple[int, Any, Any]:
    """(status, problem document or answer, headers) of one POST from the address ``source``."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(f"http://127.0.0.1:{port}/v1/alertmanager", data=BODY, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None), response.headers


async def test_headers_sent_byte_by_byte_lose_the_connection_after_the_read_timeout(
    broker: BrokerUnderTest, tokens_file: Path
) -> None:
    """A client that sends its request line and headers one byte every 50 ms (slowloris) is answered 408
    and disconnected about one read timeout (1 s) after its first byte, long before its headers would
    be complete (~10 s); nothing is published, and a normal request on another connection is served."""
    head = (
        f"POST /v1/alertmanager HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    async with listening(broker, tokens_file, http_read_timeout=1.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status_line = asyncio.create_task(reader.readline())
        sent = 0
        try:
            while sent < len(head) and not status_line.done():
                writer.write(head[sent : sent + 1])
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)
        except ConnectionError:  # the server closed the connection under us: what this test wants
            pass
        answer = await asyncio.wait_for(status_line, 30)
        cut_after = loop.time() - started
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert sent < len(head) and cut_after < 8, (sent, len(head), cut_after)
        assert (await post(server.port, bearer()))[0] == 202
    assert len(await broker.published()) == 1


async def test_an_idle_keep_alive_connection_is_not_cut_by_the_header_deadline(
    broker: BrokerUnderTest, tokens_file: Path
) -> None:
    """The header deadline is about headers only: a request answered 401 before its body was read, whose
    body's rest arrives afterwards, leaves a keep-alive connection that stays usable past the read
    timeout; the next request on it is served (202)."""
    async with listening(broker, tokens_file, http_read_timeout=1.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        def head(token: str) -> bytes:
            return (
                f"POST /v1/alertmanager HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
            ).encode()

        async def answer() -> bytes:
            status = await asyncio.wait_for(reader.readline(), 30)
            length = 0
            while (line := await asyncio.wait_for(reader.readline(), 30)) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            return status

        half = len(BODY) // 2
        writer.write(head("wrong-token-0123456789abcdef") + BODY[:half])
        await writer.drain()
        assert (await answer()).split()[1] == b"401"
        writer.write(BODY[half:])
        await writer.drain()
        await asyncio.sleep(2.5)  # idle, well past the read timeout
        writer.write(head(TOKEN) + BODY)
        await writer.drain()
        assert (await answer()).split()[1] == b"202"
        writer.close()
    assert len(await broker.published()) == 1


async def test_repeated_failed_logins_from_one_address_are_answered_429(
    broker: BrokerUnderTest, tokens_file: Path
) -> None:
    """After 3 failed authentications (the burst) from 127.0.0.1, that address gets 429 with Retry-After
    whatever it sends, the right token included, and the same answer for a wrong token as for the right
    one (it cannot tell which part failed); another address (127.0.0.2) is not affected; nothing from the
    blocked address is published; once its bucket refills, the right token passes again."""
    async with listening(
        broker, tokens_file, http_auth_failure_burst=3, http_auth_failure_rate=1.0
    ) as server:
        wrong = bearer("wrong-token-0123456789abcdef")
        assert [(await post(server.port, wrong))[0] for _ in range(3)] == [401, 401, 401]
        blocked = [await post(server.port, headers) for headers in (wrong, bearer())]
        for status, problem, headers in blocked:
            assert status == 429 and problem["type"] == "urn:incidentd:problem:rate-limited"
            assert int(headers["Retry-After"]) >= 1
        assert blocked[0][1] == blocked[1][1]
        assert TOKEN not in json.dumps(blocked[1][1])
        assert (await post(server.port, bearer(), source="127.0.0.2"))[0] == 202
        assert len(await broker.published()) == 1
        deadline = asyncio.get_running_loop().time() + 30
        while (status := (await post(server.port, bearer()))[0]) == 429:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
        assert status == 202
    assert len(await broker.published()) == 2
