"""The core's broker contract, unchanged, on the Pub/Sub emulator."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from application.ports import Broker
from config.settings import Settings
from infra.pubsub import PubSubBroker, open_broker
from tests.contract.broker_contract import RETRY_BACKOFF, BrokerContract
from tests.pubsub.conftest import backlog


class TestPubSubBroker(BrokerContract):
    """With the native dead-letter policy as a backstop (Pub/Sub counts deliveries; incidentd's attempt
    is its own attribute, so nacks at shutdown and parks are not attempts)."""

    max_delivery_attempts = 20

    @pytest.fixture
    async def open_broker(self, settings: Settings) -> object:
        settings = settings.model_copy(
            update={
                "retry_backoff": list(RETRY_BACKOFF),
                "pubsub_max_delivery_attempts": self.max_delivery_attempts,
                "concurrency": 8,
            }
        )

        @contextlib.asynccontextmanager
        async def connect() -> AsyncIterator[Broker]:
            async with open_broker(settings) as broker:
                await broker.setup()
                yield broker

        return connect

    @pytest.fixture
    def backlog(self) -> object:
        async def count(broker: PubSubBroker) -> int:
            return await backlog(broker.topology)

        return count


class TestPubSubBrokerWithoutDeadLetterPolicy(TestPubSubBroker):
    """No dead-letter policy: no ``delivery_attempt``; attempts come from incidentd's attribute."""

    max_delivery_attempts = 0
