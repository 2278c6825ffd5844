"""The core's broker contract, unchanged, on the real RabbitMQ."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from application.ports import Broker
from config.settings import Settings
from infra.rabbitmq import RabbitBroker, open_broker
from tests.contract.broker_contract import RETRY_BACKOFF, BrokerContract
from tests.rabbitmq.conftest import queue_depth


class TestRabbitBroker(BrokerContract):
    """Quorum queues (the default), with the explicit delivery limit as a backstop; attempts come from
    incidentd's own header (``x-delivery-count`` also counts hand-backs)."""

    queue_type = "quorum"

    @pytest.fixture
    async def open_broker(self, settings: Settings) -> object:
        settings = settings.model_copy(
            update={"retry_backoff": list(RETRY_BACKOFF), "rabbitmq_queue_type": self.queue_type}
        )

        @contextlib.asynccontextmanager
        async def connect() -> AsyncIterator[Broker]:
            async with open_broker(settings, prefetch=16) as broker:
                await broker.setup()
                yield broker

        return connect

    @pytest.fixture
    def backlog(self) -> object:
        async def count(broker: RabbitBroker) -> int:
            return await queue_depth([broker.topology.queue, *broker.topology.retry_queues])

        return count


class TestRabbitBrokerClassicQueues(TestRabbitBroker):
    """Classic queues: no delivery count or limit; attempts come from incidentd's own header."""

    queue_type = "classic"
