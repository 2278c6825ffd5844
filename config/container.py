"""The composition root: every adapter is created here, and only when the settings select it.

Heavy client libraries are imported inside the provider functions, so a RabbitMQ worker never loads
Pub/Sub's or AWS's. Resources are started on first use (``await container.broker()``), never all at once,
and ``shutdown_resources()`` closes what was started, in reverse order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dependency_injector import containers, providers

from application.commands import Command
from application.dispatcher import Dispatcher, Observer, RetryPolicy, bind
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import IncidentPolicy
from application.ports import Broker, IncidentStore
from common.logging import configure_logging
from config.settings import Settings

# --- stores -----------------------------------------------------------------------------------------


async def sqlite_store(settings: Settings) -> AsyncIterator[IncidentStore]:
    from infra.sqlite.store import SqliteStore

    store = await SqliteStore.open(settings.sqlite_path)
    try:
        yield store
    finally:
        await store.close()


# --- brokers ----------------------------------------------------------------------------------------


async def memory_broker(settings: Settings) -> AsyncIterator[Broker]:
    from infra.memory import MemoryBroker
    from infra.sqlite.dead_letters import SqliteDeadLetters

    broker = MemoryBroker(await SqliteDeadLetters.open(settings.sqlite_path), prefetch=settings.concurrency * 2)
    try:
        yield broker
    finally:
        await broker.close()


async def rabbitmq_broker(settings: Settings) -> AsyncIterator[Broker]:
    from infra.rabbitmq import open_broker

    async with open_broker(settings) as broker:
        yield broker


# --- the core ---------------------------------------------------------------------------------------


def build_dispatcher(
    settings: Settings,
    handlers: dict[type[Command], list],  # type: ignore[type-arg]
    dependencies: dict[str, object],
    observers: list[Observer],
) -> Dispatcher:
    return Dispatcher(
        CommandFactory(handlers),
        bind(handlers, dependencies),
        concurrency=settings.concurrency,
        timeout=settings.command_timeout,
        timeouts=settings.command_timeouts,
        retry=RetryPolicy(
            max_attempts=settings.max_attempts,
            backoff=tuple(settings.retry_backoff),
            in_process_attempts=settings.in_process_attempts,
        ),
        observers=observers,
    )


class Container(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)

    logging = providers.Resource(
        configure_logging, fmt=settings.provided.log_format, level=settings.provided.log_level
    )
    store = providers.Selector(
        settings.provided.store,
        sqlite=providers.Resource(sqlite_store, settings),
    )
    broker = providers.Selector(
        settings.provided.broker,
        memory=providers.Resource(memory_broker, settings),
        rabbitmq=providers.Resource(rabbitmq_broker, settings),
    )
    policy = providers.Singleton(
        IncidentPolicy,
        service_labels=settings.provided.service_labels,
        environment_labels=settings.provided.environment_labels,
        severity_label=settings.provided.severity_label,
    )
    handlers = providers.Object(HANDLERS)
    # The names handlers may ask for (see application.dispatcher.bind).
    handler_dependencies = providers.Dict(store=store, policy=policy)
    observers = providers.List()
    dispatcher = providers.Singleton(build_dispatcher, settings, handlers, handler_dependencies, observers)
