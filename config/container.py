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
from application.ports import ActionRunner, Broker, IncidentObserver, IncidentStore
from common.logging import configure_logging
from config.settings import Settings

# --- stores -----------------------------------------------------------------------------------------


async def sqlite_store(settings: Settings, observer: IncidentObserver) -> AsyncIterator[IncidentStore]:
    from infra.sqlite.store import SqliteStore

    store = await SqliteStore.open(settings.sqlite_path, observer)
    try:
        yield store
    finally:
        await store.close()


async def postgres_store(settings: Settings, observer: IncidentObserver) -> AsyncIterator[IncidentStore]:
    from infra.postgres.store import PostgresStore

    store = await PostgresStore.open(
        settings.postgres_dsn, min_size=settings.postgres_pool_min, max_size=settings.postgres_pool_max,
        schema=settings.postgres_schema, observer=observer,
    )  # fmt: skip
    try:
        yield store
    finally:
        await store.close()


# --- incidents: metrics and custom OEC actions ----------------------------------------------------------


def incident_metrics(registry: object = None) -> IncidentObserver:
    """Incident counters/histograms on ``registry`` (the ops server's; a private one until wired)."""
    from prometheus_client import CollectorRegistry

    from infra.incident_metrics import register_incident_metrics

    return register_incident_metrics(
        registry if isinstance(registry, CollectorRegistry) else CollectorRegistry()
    )


async def incident_gauge(metrics: IncidentObserver, store: IncidentStore) -> AsyncIterator[None]:
    """Keeps the active-incidents gauge fresh while started (by whoever serves /metrics)."""
    import asyncio

    from infra.incident_metrics import keep_fresh

    task = asyncio.create_task(keep_fresh(metrics, store))  # type: ignore[arg-type]
    try:
        yield None
    finally:
        task.cancel()


def no_actions() -> ActionRunner:
    from infra.noop_actions import NoActions

    return NoActions()


# --- brokers ----------------------------------------------------------------------------------------


async def memory_broker(settings: Settings) -> AsyncIterator[Broker]:
    from infra.memory import MemoryBroker
    from infra.sqlite.dead_letters import SqliteDeadLetters

    broker = MemoryBroker(
        await SqliteDeadLetters.open(settings.sqlite_path), prefetch=settings.concurrency * 2
    )
    try:
        yield broker
    finally:
        await broker.close()


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
    incident_metrics = providers.Singleton(incident_metrics)
    store = providers.Selector(
        settings.provided.store,
        sqlite=providers.Resource(sqlite_store, settings, incident_metrics),
        postgres=providers.Resource(postgres_store, settings, incident_metrics),
    )
    incident_gauge = providers.Resource(incident_gauge, incident_metrics, store)
    actions = providers.Singleton(no_actions)
    broker = providers.Selector(
        settings.provided.broker,
        memory=providers.Resource(memory_broker, settings),
    )
    policy = providers.Singleton(
        IncidentPolicy,
        service_labels=settings.provided.service_labels,
        environment_labels=settings.provided.environment_labels,
        severity_label=settings.provided.severity_label,
        correlation_window=settings.provided.correlation_window,
    )
    handlers = providers.Object(HANDLERS)
    # The names handlers may ask for (see application.dispatcher.bind).
    handler_dependencies = providers.Dict(store=store, policy=policy, actions=actions)
    observers = providers.List()
    dispatcher = providers.Singleton(build_dispatcher, settings, handlers, handler_dependencies, observers)
