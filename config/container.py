"""The composition root: every adapter is created here, and only when the settings select it.

Heavy client libraries are imported inside the provider functions, so a RabbitMQ worker never loads
Pub/Sub's or AWS's. Resources are started on first use (``await container.broker()``), never all at once,
and ``shutdown_resources()`` closes what was started, in reverse order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from dependency_injector import containers, providers

from application.actions import ActionRules
from application.analysis import Analysis, AnalysisPolicy, after_commit_steps, with_analysis
from application.commands import Command
from application.dispatcher import Dispatcher, Observer, Receiver, RetryPolicy, bind, bind_all
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import IncidentPolicy
from application.ports import (
    ActionRunner,
    Broker,
    Cloud,
    Cluster,
    IncidentObserver,
    IncidentStore,
    IssueTracker,
    Notifier,
)
from common.logging import configure_logging
from config.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from infra.clickhouse import EventLake
    from infra.incident_metrics import IncidentMetrics
    from infra.maintenance import Maintenance
    from infra.metrics import Metrics

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


# --- incidents: metrics and action rules --------------------------------------------------------------


def incident_metrics(registry: CollectorRegistry) -> IncidentMetrics:
    """Incident counters, histograms and the active gauge, on the ops server's registry."""
    from infra.incident_metrics import register_incident_metrics

    return register_incident_metrics(registry)


async def incident_gauge(metrics: IncidentMetrics, store: IncidentStore) -> AsyncIterator[None]:
    """Keeps the active-incidents gauge fresh while started (by whoever serves /metrics)."""
    import asyncio

    from infra.incident_metrics import keep_fresh

    task = asyncio.create_task(keep_fresh(metrics, store))
    try:
        yield None
    finally:
        task.cancel()


def action_rules(
    settings: Settings, cluster: Cluster | None, cloud: Cloud | None, policy: IncidentPolicy
) -> ActionRunner:
    """The action rules (application/actions.py), acting through the adapters that are enabled."""
    return ActionRules(
        settings.action_rules, cluster=cluster, cloud=cloud, policy=policy, dry_run=settings.dry_run
    )


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


async def rabbitmq_broker(settings: Settings, metrics: Metrics) -> AsyncIterator[Broker]:
    from infra.rabbitmq import open_broker

    async with open_broker(settings, on_reconnect=metrics.reconnected) as broker:
        yield broker


async def pubsub_broker(settings: Settings) -> AsyncIterator[Broker]:
    from infra.pubsub import open_broker

    async with open_broker(settings) as broker:
        yield broker


# --- adapters: Kubernetes and AWS (created only when enabled; handlers get None otherwise) -----------


async def kubernetes_cluster(settings: Settings) -> AsyncIterator[Cluster]:
    from infra.kubernetes import connect

    cluster = await connect(
        host=settings.kubernetes_host,
        kubeconfig=settings.kubernetes_kubeconfig,
        context=settings.kubernetes_context,
        call_timeout=settings.kubernetes_timeout,
        dry_run=settings.dry_run,
    )
    try:
        yield cluster
    finally:
        await cluster.close()


async def aws_cloud(settings: Settings) -> AsyncIterator[Cloud]:
    from infra.aws import AwsCloud

    cloud = AwsCloud(
        region=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        archive_bucket=settings.aws_archive_bucket,
        metric_namespace=settings.aws_metric_namespace,
        timeout=settings.aws_timeout,
        max_attempts=settings.aws_max_attempts,
        dry_run=settings.dry_run,
    )
    try:
        yield cloud
    finally:
        await cloud.close()


def _switch(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


def when_enabled(flag: providers.Provider, resource: providers.Resource) -> providers.Selector:  # type: ignore[type-arg]
    """``resource`` when the setting ``flag`` is true; else None, and nothing is created or imported."""
    return providers.Selector(
        providers.Callable(_switch, flag), enabled=resource, disabled=providers.Object(None)
    )


# --- adapters: event lake, GitHub issues, Slack (created only when enabled) --------------------------


async def clickhouse_event_lake(settings: Settings) -> AsyncIterator[EventLake]:
    """Closed after the worker has drained, so the last outcomes are flushed to ClickHouse."""
    from infra.clickhouse import from_settings

    lake = from_settings(settings)
    await lake.start()
    try:
        yield lake
    finally:
        await lake.close()


async def github_issues(settings: Settings) -> AsyncIterator[IssueTracker]:
    from infra.github import from_settings

    tracker = from_settings(settings)
    try:
        yield tracker
    finally:
        await tracker.close()


async def slack_notifier(settings: Settings) -> AsyncIterator[Notifier]:
    from infra.slack import from_settings

    slack = from_settings(settings)
    try:
        yield slack
    finally:
        await slack.close()


def with_lake(observers: list[Observer], lake: EventLake | None) -> list[Observer]:
    """The dispatcher's outcome observers, plus the event lake's ``record`` when it is enabled."""
    return [*observers, lake.record] if lake is not None else observers


# --- AI analysis (docs/ai.md; created, and its libraries imported, only when ai_enabled) ------------


async def ai_analysis(settings: Settings, broker: Broker, metrics: Metrics) -> AsyncIterator[Analysis]:
    """The analysis side effect: the configured model, the runbook index, requests via the broker."""
    from infra.ai.knowledge import RunbookIndex
    from infra.ai.metrics import AnalysisMetrics

    analyst: Any
    if settings.ai_provider == "bedrock":
        from infra.ai.bedrock import BedrockConverse

        analyst = BedrockConverse(
            model=settings.ai_model, region=settings.ai_region, endpoint_url=settings.ai_endpoint_url,
            timeout=settings.ai_timeout,
        )  # fmt: skip
    else:
        import aiohttp

        from infra.ai.openai import OpenAIChat
        from infra.secrets import read_secret

        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.ai_timeout))
        analyst = OpenAIChat(session, base_url=settings.ai_base_url, model=settings.ai_model,
                             api_key=read_secret(settings.ai_api_key, settings.ai_api_key_file),
                             json_mode=settings.ai_json_mode)  # fmt: skip
    policy = AnalysisPolicy(
        min_severity=settings.ai_min_severity, token_budget=settings.ai_token_budget,
        max_output_tokens=settings.ai_max_output_tokens, max_per_hour=settings.ai_max_per_hour,
        top_k=settings.ai_top_k, history=settings.ai_history, timeout=settings.ai_timeout,
    )  # fmt: skip
    try:
        yield Analysis(analyst, RunbookIndex(settings.ai_knowledge_dir), broker.publisher, policy,
                       observer=AnalysisMetrics(metrics.registry))  # fmt: skip
    finally:
        await analyst.close()


# --- ops: metrics (the ops server itself is started by `app.py worker`) ---------------------------


def build_metrics(handlers: dict[type[Command], list]) -> Metrics:  # type: ignore[type-arg]
    from infra.metrics import Metrics

    return Metrics(command_types=CommandFactory(handlers).types)


# --- maintenance: retention and archival (infra/maintenance.py) ---------------------------------------


def build_maintenance(settings: Settings, store: IncidentStore, cloud: Cloud | None) -> Maintenance:
    from infra.maintenance import Maintenance, days

    return Maintenance(
        store,  # type: ignore[arg-type]  # both stores implement MaintainedStore
        processed_retention=days(settings.processed_messages_retention_days),
        batch_size=settings.maintenance_batch_size,
        incident_retention=(
            days(settings.incident_retention_days) if settings.incident_archive_enabled else None
        ),
        cloud=cloud,
    )


async def maintenance_loop(settings: Settings, maintenance: Maintenance) -> AsyncIterator[None]:
    """The worker's periodic maintenance while started (``maintenance_interval`` 0: none)."""
    from infra.maintenance import periodic

    async for _ in periodic(maintenance, settings.maintenance_interval):
        yield None


# --- the core ---------------------------------------------------------------------------------------


def build_dispatcher(
    settings: Settings,
    handlers: dict[type[Command], list],  # type: ignore[type-arg]
    dependencies: dict[str, object],
    observers: list[Observer],
    receivers: list[Receiver],
) -> Dispatcher:
    return Dispatcher(
        CommandFactory(handlers),
        bind(handlers, dependencies),
        after_commit=bind_all(after_commit_steps(settings.ai_enabled), dependencies),
        concurrency=settings.concurrency,
        timeout=settings.command_timeout,
        timeouts=settings.command_timeouts,
        retry=RetryPolicy(
            max_attempts=settings.max_attempts,
            backoff=tuple(settings.retry_backoff),
            in_process_attempts=settings.in_process_attempts,
        ),
        observers=observers,
        receivers=receivers,
    )


class Container(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)

    logging = providers.Resource(
        configure_logging,
        fmt=settings.provided.log_format,
        level=settings.provided.log_level,
        repeat_window=settings.provided.log_repeat_window,
    )
    handlers = providers.Singleton(with_analysis, HANDLERS)
    metrics = providers.Singleton(build_metrics, handlers)
    incident_metrics = providers.Singleton(incident_metrics, metrics.provided.registry)
    store = providers.Selector(
        settings.provided.store,
        sqlite=providers.Resource(sqlite_store, settings, incident_metrics),
        postgres=providers.Resource(postgres_store, settings, incident_metrics),
    )
    incident_gauge = providers.Resource(incident_gauge, incident_metrics, store)
    broker = providers.Selector(
        settings.provided.broker,
        memory=providers.Resource(memory_broker, settings),
        rabbitmq=providers.Resource(rabbitmq_broker, settings, metrics),
        pubsub=providers.Resource(pubsub_broker, settings),
    )
    policy = providers.Singleton(
        IncidentPolicy,
        service_labels=settings.provided.service_labels,
        environment_labels=settings.provided.environment_labels,
        severity_label=settings.provided.severity_label,
        correlation_window=settings.provided.correlation_window,
        namespace_labels=settings.provided.kubernetes_namespace_labels,
        deployment_labels=settings.provided.kubernetes_deployment_labels,
    )
    # Adapters (issue 6): a Resource only when enabled, else None.
    cluster = when_enabled(
        settings.provided.kubernetes_enabled, providers.Resource(kubernetes_cluster, settings)
    )
    cloud = when_enabled(settings.provided.aws_enabled, providers.Resource(aws_cloud, settings))
    event_lake = when_enabled(
        settings.provided.clickhouse_enabled, providers.Resource(clickhouse_event_lake, settings)
    )
    issue_tracker = when_enabled(
        settings.provided.github_enabled, providers.Resource(github_issues, settings)
    )
    notifier = when_enabled(settings.provided.slack_enabled, providers.Resource(slack_notifier, settings))
    actions = providers.Singleton(action_rules, settings, cluster, cloud, policy)
    analysis = when_enabled(
        settings.provided.ai_enabled, providers.Resource(ai_analysis, settings, broker, metrics)
    )
    # The names handlers may ask for (see application.dispatcher.bind).
    handler_dependencies = providers.Dict(
        store=store,
        policy=policy,
        actions=actions,
        cluster=cluster,
        cloud=cloud,
        issue_tracker=issue_tracker,
        notifier=notifier,
        analysis=analysis,
    )
    observers = providers.List(metrics.provided.observe)
    outcome_observers = providers.Callable(with_lake, observers, event_lake)
    receivers = providers.List(metrics.provided.received)
    dispatcher = providers.Singleton(
        build_dispatcher, settings, handlers, handler_dependencies, outcome_observers, receivers
    )
    # Retention and archival: `app.py maintenance` runs it once, the worker every maintenance_interval.
    maintenance = providers.Singleton(build_maintenance, settings, store, cloud)
    maintenance_loop = providers.Resource(maintenance_loop, settings, maintenance)
