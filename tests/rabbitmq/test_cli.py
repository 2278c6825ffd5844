"""``app.py setup`` and ``app.py publish`` against the real RabbitMQ."""

from __future__ import annotations

import aio_pika

from config.settings import Settings
from infra.rabbitmq.topology import Topology
from tests.rabbitmq.conftest import URL
from tests.workers import run_app


async def app(settings: Settings, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run ``python app.py ARGS`` on this test's topology."""
    return await run_app(_env(settings), *args, stdin=stdin)


def _env(settings: Settings) -> dict[str, str]:
    return {
        "INCIDENTD_BROKER": "rabbitmq",
        "INCIDENTD_RABBITMQ_URL": settings.rabbitmq_url,
        "INCIDENTD_RABBITMQ_EXCHANGE": settings.rabbitmq_exchange,
        "INCIDENTD_RABBITMQ_QUEUE": settings.rabbitmq_queue,
        "INCIDENTD_RETRY_BACKOFF": str(settings.retry_backoff),
        "INCIDENTD_LOG_LEVEL": "error",
    }


async def test_publish_sets_id_type_content_type_and_timestamp(settings: Settings) -> None:
    """After ``setup``, ``publish TYPE -`` prints the message id; the queued message carries that id,
    the type as header, property and routing key, a JSON content type and a timestamp."""
    code, out = await app(settings, "setup")
    assert code == 0, out
    code, out = await app(settings, "publish", "incident.create", "-", stdin=b'{"title": "db down"}')
    assert code == 0, out
    message_id = out.strip()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology.from_settings(settings).queue, passive=True)
        message = await queue.get(no_ack=True, timeout=5)
    assert message is not None
    assert message.message_id == message_id
    assert message.headers["type"] == message.type == message.routing_key == "incident.create"
    assert message.content_type == "application/json"
    assert message.timestamp is not None
    assert message.body == b'{"title": "db down"}'


async def test_unconfirmed_publish_is_an_error(settings: Settings) -> None:
    """Publishing when the exchange does not exist (setup never ran) fails with exit code 1 and says
    the message was not confirmed, instead of losing it silently."""
    code, out = await app(settings, "publish", "incident.create", "-", stdin=b'{"title": "x"}')
    assert code == 1
    assert "not confirmed" in out
