"""Never a 2xx without the broker's confirm: a broker that is cut off, or confirms too late, gives 503
with Retry-After; the sender's retry, once the broker is back, is accepted under the same message id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import fixture_json
from tests.ingest.conftest import bearer, broker_under_test, eventually, serving

pytestmark = pytest.mark.integration


async def test_a_broker_outage_is_a_503_and_the_retry_is_accepted(
    broker_kind: str, tokens_file: Path
) -> None:
    """While the connection to the broker is cut, the ingest answers 503 + Retry-After (problem type
    broker-unavailable); once it is back, the same request is accepted, with the same message id."""
    body = json.dumps(fixture_json("alertmanager_firing")).encode()
    async with (
        broker_under_test(broker_kind, proxied=True) as broker,
        serving(broker, tokens_file, http_publish_timeout=2.0, http_retry_after=7) as client,
    ):
        assert broker.proxy is not None
        async with (
            broker.proxy.outage(),
            client.post("/v1/alertmanager", data=body, headers=bearer()) as response,
        ):
            assert response.status == 503
            assert response.headers["Retry-After"] == "7"
            problem = await response.json(content_type="application/problem+json")
            assert problem["type"] == "urn:incidentd:problem:broker-unavailable"

        async def accepted() -> str | None:
            async with client.post("/v1/alertmanager", data=body, headers=bearer()) as response:
                return (await response.json())["message_id"] if response.status == 202 else None

        message_id = await eventually(accepted, timeout=90, interval=0.5)
        assert {p.message_id for p in await broker.published()} == {message_id}


async def test_a_confirm_slower_than_the_publish_timeout_is_a_503(
    broker_kind: str, tokens_file: Path
) -> None:
    """A broker that confirms later than http_publish_timeout gets a 503; should the late publish land
    after all, it carries the same message id as the sender's retry, so the worker applies it once."""
    body = json.dumps(fixture_json("oec_create")).encode()
    async with (
        broker_under_test(broker_kind, proxied=True) as broker,
        serving(broker, tokens_file, http_publish_timeout=0.3) as client,
    ):
        assert broker.proxy is not None
        broker.proxy.delay = 1.0
        async with client.post("/v1/opsgenie", data=body, headers=bearer()) as response:
            assert response.status == 503
        broker.proxy.delay = 0.0

        async def accepted() -> str | None:
            async with client.post("/v1/opsgenie", data=body, headers=bearer()) as response:
                return (await response.json())["message_id"] if response.status == 202 else None

        message_id = await eventually(accepted, timeout=60, interval=0.5)
        assert {p.message_id for p in await broker.published()} == {message_id}
