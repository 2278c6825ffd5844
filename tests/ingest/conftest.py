"""One ingest suite, two brokers: every test that takes ``broker`` runs on RabbitMQ and on the Pub/Sub
emulator, with a fresh topology of its own, and can read back what was published (``published``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from application.handlers import HANDLERS
from application.ports import Broker
from config.settings import Settings
from infra.web.app import make_app
from infra.web.auth import Tokens
from infra.web.server import build_deps
from tests.proxy import TcpProxy

TOKEN = "ingest-token-0123456789abcdef"
READ_TOKEN = "read-only-token-0123456789abcd"
TOKENS = f"alertmanager:{TOKEN}\nviewer:{READ_TOKEN}:read\n"
BROKERS = ["rabbitmq", "pubsub"]


@dataclass
class Published:
    body: bytes
    attributes: dict[str, str]
    message_id: str


@dataclass
class BrokerUnderTest:
    """A broker of one kind with its own topology (created), and how to read back what reached it."""

    kind: str
    settings: Settings
    broker: Broker
    proxy: TcpProxy | None = None
    _seen: list[Published] = field(default_factory=list)

    async def published(self) -> list[Published]:
        """Every message published so far (read off the queue / subscription and kept here)."""
        self._seen += await (_rabbit_take if self.kind == "rabbitmq" else _pubsub_take)(self.settings)
        return list(self._seen)


async def _rabbit_take(settings: Settings) -> list[Published]:
    import aio_pika

    from infra.rabbitmq.topology import Topology

    found = []
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(Topology.from_settings(settings).queue, ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            headers = {k: str(v.decode() if isinstance(v, bytes) else v) for k, v in message.headers.items()}
            found.append(Published(message.body, headers, message.message_id or ""))
    return found


def _pubsub_pull(settings: Settings) -> list[Published]:
    from google.cloud import pubsub_v1

    from infra.pubsub.message import MESSAGE_ID_ATTR
    from infra.pubsub.topology import Topology

    found = []
    with pubsub_v1.SubscriberClient() as subscriber:
        path = Topology.from_settings(settings).subscription_path
        for _ in range(3):
            response = subscriber.pull(
                subscription=path, max_messages=1000, return_immediately=True, timeout=10
            )
            if not response.received_messages:
                continue
            for received in response.received_messages:
                attributes = dict(received.message.attributes)
                found.append(
                    Published(received.message.data, attributes, attributes.get(MESSAGE_ID_ATTR, ""))
                )
            subscriber.acknowledge(subscription=path, ack_ids=[r.ack_id for r in response.received_messages])
    return found


async def _pubsub_take(settings: Settings) -> list[Published]:
    return await asyncio.to_thread(_pubsub_pull, settings)


@contextlib.asynccontextmanager
async def broker_under_test(
    kind: str, *, proxied: bool = False, **overrides: Any
) -> AsyncIterator[BrokerUnderTest]:
    """A broker of ``kind`` with a fresh topology; with ``proxied``, its connection goes through a
    TcpProxy (``.proxy``) so a test can cut it."""
    if kind == "rabbitmq":
        from infra.rabbitmq import open_broker
        from tests.rabbitmq.conftest import delete_topology, rabbitmq_available, rabbitmq_settings

        rabbitmq_available()
        settings = rabbitmq_settings(**overrides)
        async with contextlib.AsyncExitStack() as stack:
            proxy = None
            url = settings.rabbitmq_url
            if proxied:
                proxy = await stack.enter_async_context(TcpProxy("127.0.0.1", 5672))
                url = proxy.url(url)
            async with open_broker(settings.model_copy(update={"rabbitmq_url": url})) as broker:
                await broker.setup()
                try:
                    yield BrokerUnderTest(kind, settings, broker, proxy)
                finally:
                    from infra.rabbitmq.topology import Topology

                    await delete_topology(Topology.from_settings(settings))
        return
    from infra.pubsub import open_broker as open_pubsub
    from infra.pubsub.topology import Topology as PubSubTopology
    from tests.pubsub.conftest import delete_topology as delete_pubsub
    from tests.pubsub.conftest import pubsub_settings

    settings = pubsub_settings(**overrides)
    host, _, port = os.environ["PUBSUB_EMULATOR_HOST"].rpartition(":")
    async with contextlib.AsyncExitStack() as stack:
        proxy = None
        if proxied:
            proxy = await stack.enter_async_context(TcpProxy(host, int(port)))
            stack.enter_context(_emulator_at(f"127.0.0.1:{proxy.port}"))
        broker = await stack.enter_async_context(open_pubsub(settings))
        await broker.setup()
        try:
            yield BrokerUnderTest(kind, settings, broker, proxy)
        finally:
            await delete_pubsub(PubSubTopology.from_settings(settings))


@contextlib.contextmanager
def _emulator_at(host: str) -> Iterator[None]:
    previous = os.environ["PUBSUB_EMULATOR_HOST"]
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    try:
        yield
    finally:
        os.environ["PUBSUB_EMULATOR_HOST"] = previous


@pytest.fixture(params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "pubsub":
        request.getfixturevalue("pubsub_emulator")
    return str(request.param)


@pytest.fixture
async def broker(broker_kind: str) -> AsyncIterator[BrokerUnderTest]:
    async with broker_under_test(broker_kind) as under_test:
        yield under_test


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    return path


Client = TestClient[aiohttp.web.Request, aiohttp.web.Application]


@contextlib.asynccontextmanager
async def serving(
    under_test: BrokerUnderTest, tokens: Path | None, **overrides: Any
) -> AsyncIterator[Client]:
    """The real application (make_app) on a loopback port, publishing to ``under_test``'s broker."""
    from prometheus_client import CollectorRegistry

    settings = under_test.settings.model_copy(update=overrides)
    loaded = Tokens.load(tokens) if tokens is not None else None
    deps = build_deps(settings, under_test.broker, CollectorRegistry(), loaded, HANDLERS)
    async with TestClient(TestServer(make_app(deps), host="127.0.0.1")) as client:
        yield client


@pytest.fixture
async def client(broker: BrokerUnderTest, tokens_file: Path) -> AsyncIterator[Client]:
    async with serving(broker, tokens_file) as client:
        yield client


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def eventually(condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Wait until ``condition()`` (sync or async) is truthy; its value. Fails after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
