"""The composition root: the settings select the adapters, and the handlers get them by name.

Every adapter opens and closes itself (its module's ``open_…`` async context manager); the container
names it by path, so that the module and its client library are imported only when the resource is
first used (``await container.broker()``): a RabbitMQ worker never loads Pub/Sub's or AWS's.
``shutdown_resources()`` closes what was opened, in reverse order.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from dependency_injector import containers, providers

from application.actions import ActionRules
from application.analysis import after_commit_steps, with_analysis
from application.dispatcher import Dispatcher, Observer, RetryPolicy, bind, bind_all
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import IncidentPolicy
from application.settle import SettledRecord
from common.logging import configure_logging
from config.settings import Settings
from infra.incident_metrics import IncidentMetrics
from infra.maintenance import from_settings as maintenance_from_settings
from infra.metrics import Metrics

if TYPE_CHECKING:
    from infra.clickhouse import EventLake


async def _open(path: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
    """What the async context manager ``path`` ("module.open_…", imported now) yields, while open."""
    module, name = path.rsplit(".", 1)
    async with getattr(importlib.import_module(module), name)(*args, **kwargs) as opened:
        yield opened


def opened(path: str, *args: Any, **kwargs: Any) -> providers.Resource[Any]:
    """A Resource over :func:`_open` (an async generator, which every dependency-injector 4.x opens)."""
    return providers.Resource(_open, path, *args, **kwargs)


def when_enabled(flag: providers.Provider[bool], path: str, *args: Any) -> providers.Selector[Any]:
    """:func:`opened` when the setting ``flag`` is true; else None, and nothing is opened or imported."""
    return providers.Selector(
        providers.Callable(_on_or_off, flag), on=opened(path, *args), off=providers.Object(None)
    )


def _on_or_off(flag: bool) -> str:
    return "on" if flag else "off"


def _outcome_observers(metrics: Metrics, extra: list[Observer], lake: EventLake | None) -> list[Observer]:
    """Metrics, the caller's own (``worker --from`` counts outcomes), then the event lake if enabled."""
    return [metrics.observe, *extra, *([lake.record] if lake is not None else [])]


class Container(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)
    extra_observers = providers.Dependency(instance_of=list, default=[])  # Container(extra_observers=[…])

    logging = providers.Resource(configure_logging, fmt=settings.provided.log_format,
                                 level=settings.provided.log_level,
                                 repeat_window=settings.provided.log_repeat_window)  # fmt: skip
    handlers = providers.Singleton(with_analysis, HANDLERS)
    command_factory = providers.Singleton(CommandFactory, handlers)
    metrics = providers.Singleton(Metrics, command_types=command_factory.provided.types)
    incident_metrics = providers.Singleton(IncidentMetrics, metrics.provided.registry)
    store = providers.Selector(
        settings.provided.store,
        sqlite=opened("infra.sqlite.store.open_store", settings, incident_metrics),
        postgres=opened("infra.postgres.store.open_store", settings, incident_metrics),
    )
    # Opened by whoever serves /metrics.
    incident_gauge: providers.Resource[None] = opened(
        "infra.incident_metrics.open_gauge_refresh", incident_metrics, store
    )
    broker = providers.Selector(
        settings.provided.broker,
        memory=opened("infra.memory.broker.open_broker", settings),
        rabbitmq=opened("infra.rabbitmq.open_broker", settings, on_reconnect=metrics.provided.reconnected),
        pubsub=opened("infra.pubsub.open_broker", settings),
    )
    policy = providers.Singleton(
        IncidentPolicy, service_labels=settings.provided.service_labels,
        environment_labels=settings.provided.environment_labels,
        severity_label=settings.provided.severity_label,
        correlation_window=settings.provided.correlation_window,
        namespace_labels=settings.provided.kubernetes_namespace_labels,
        deployment_labels=settings.provided.kubernetes_deployment_labels,
    )  # fmt: skip
    cluster = when_enabled(settings.provided.kubernetes_enabled, "infra.kubernetes.open_cluster", settings)
    cloud = when_enabled(settings.provided.aws_enabled, "infra.aws.open_cloud", settings)
    event_lake = when_enabled(
        settings.provided.clickhouse_enabled, "infra.clickhouse.open_event_lake", settings
    )
    issue_tracker = when_enabled(
        settings.provided.github_enabled, "infra.github.open_issue_tracker", settings
    )
    notifier = when_enabled(settings.provided.slack_enabled, "infra.slack.open_notifier", settings)
    analysis = when_enabled(settings.provided.ai_enabled, "infra.ai.analysis.open_analysis", settings, broker,
                            metrics.provided.registry)  # fmt: skip
    actions = providers.Singleton(ActionRules, settings.provided.action_rules, cluster=cluster, cloud=cloud,
                                  policy=policy, dry_run=settings.provided.dry_run)  # fmt: skip
    # The names handlers may ask for (see application.dispatcher.bind).
    handler_dependencies = providers.Dict(store=store, policy=policy, actions=actions, cluster=cluster,
                                          cloud=cloud, issue_tracker=issue_tracker, notifier=notifier,
                                          analysis=analysis)  # fmt: skip
    outcome_observers = providers.Callable(_outcome_observers, metrics, extra_observers, event_lake)
    receivers = providers.List(metrics.provided.received)
    retry = providers.Factory(RetryPolicy, max_attempts=settings.provided.max_attempts,
                              backoff=providers.Callable(tuple, settings.provided.retry_backoff),
                              in_process_attempts=settings.provided.in_process_attempts)  # fmt: skip
    # Run once a message's transaction committed: the follow-ups of the incidents it changed.
    after_commit = providers.Callable(
        bind_all, providers.Callable(after_commit_steps, settings.provided.ai_enabled), handler_dependencies
    )
    # A second live copy of a message already settled (a late copy confirm, a lost ack) is acked unrun.
    settled = providers.Singleton(SettledRecord, store)
    dispatcher = providers.Singleton(
        Dispatcher, command_factory, providers.Callable(bind, handlers, handler_dependencies),
        after_commit=after_commit,
        concurrency=settings.provided.concurrency, timeout=settings.provided.command_timeout,
        timeouts=settings.provided.command_timeouts, retry=retry, observers=outcome_observers,
        receivers=receivers, settled=settled,
    )  # fmt: skip
    # Retention and archival: `app.py maintenance` runs it once, the worker every maintenance_interval.
    maintenance = providers.Singleton(maintenance_from_settings, settings, store, cloud)
    maintenance_loop: providers.Resource[None] = opened("infra.maintenance.open_loop", settings, maintenance)
