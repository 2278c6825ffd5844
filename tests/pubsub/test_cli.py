"""``app.py setup``, ``publish`` and ``dlq list`` against the Pub/Sub emulator (each a process)."""

from __future__ import annotations

import json
from pathlib import Path

from config.settings import Settings
from infra.pubsub.message import MESSAGE_ID_ATTR
from infra.pubsub.topology import Topology
from tests.pubsub.test_dead_letters import pull_raw
from tests.workers import run_app


async def app(settings: Settings, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run ``python app.py ARGS``; PUBSUB_EMULATOR_HOST comes from the session."""
    return await run_app(_env(settings), *args, stdin=stdin)


def _env(settings: Settings) -> dict[str, str]:
    return {
        "INCIDENTD_BROKER": "pubsub",
        "INCIDENTD_PUBSUB_PROJECT": settings.pubsub_project,
        "INCIDENTD_PUBSUB_TOPIC": settings.pubsub_topic,
        "INCIDENTD_PUBSUB_SUBSCRIPTION": settings.pubsub_subscription,
        "INCIDENTD_PUBSUB_PUBLISH_TIMEOUT": "10",
        "INCIDENTD_LOG_LEVEL": "error",
    }


async def test_setup_then_publish_sets_type_and_message_id(settings: Settings, tmp_path: Path) -> None:
    """``setup`` creates the topology (twice: idempotent); ``publish TYPE -`` prints the message id, and
    the message on the subscription carries it and the type as attributes, with the body unchanged."""
    for _ in range(2):
        code, out = await app(settings, "setup")
        assert code == 0, out
    code, out = await app(settings, "publish", "incident.create", "-", "-a", "tenant=acme",
                          stdin=b'{"title": "db down"}')  # fmt: skip
    assert code == 0, out
    message_id = out.strip().splitlines()[-1]
    [(body, attributes, _)] = await pull_raw(Topology.from_settings(settings).subscription_path)
    assert body == b'{"title": "db down"}'
    assert attributes == {"type": "incident.create", "tenant": "acme", MESSAGE_ID_ATTR: message_id}
    code, out = await app(settings, "dlq", "list", "--json")
    assert code == 0, out
    assert json.loads(out) == []


async def test_publish_without_a_topic_is_an_error(settings: Settings) -> None:
    """Publishing when the topic does not exist (setup never ran) exits 1 and says the message was not
    confirmed, instead of losing it silently."""
    code, out = await app(settings, "publish", "incident.create", "-", stdin=b'{"title": "x"}')
    assert code == 1
    assert "not confirmed" in out
