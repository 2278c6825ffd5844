"""Typed, read-only views of the flat settings, one per adapter or server.

The flat ``INCIDENTD_*`` names stay the public interface (one environment variable, one JSON key, one
secrets file per setting); an adapter reads its own group instead, ``settings.clickhouse.batch_size``
rather than ``settings.clickhouse_batch_size``, so it can take one small object and cannot reach into
another adapter's settings. Each field of a view is the setting ``<prefix><field>`` unless its metadata
names another; tests/unit/test_settings_views.py checks that every view field is a setting of the same
type and that every setting with a view's prefix is in that view.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import SecretStr

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from config.settings import SlackRoute

Severity = Literal["critical", "high", "medium", "low", "info"]
QueueType = Literal["quorum", "classic"]
AiProvider = Literal["openai", "bedrock"]
HttpAuth = Literal["tokens", "none"]

View = TypeVar("View", bound="DataclassInstance")


def setting_name(view_field: dataclasses.Field[Any], prefix: str) -> str:
    """The flat setting a view field reads."""
    name: str = view_field.metadata.get("setting", prefix + view_field.name)
    return name


def view_of(cls: type[View], settings: object, prefix: str) -> View:
    """An instance of the view ``cls`` filled from the flat settings."""
    fields = dataclasses.fields(cls)
    return cls(**{f.name: getattr(settings, setting_name(f, prefix)) for f in fields})


def _named(setting: str) -> Any:
    """A view field that reads a setting outside the view's prefix."""
    return field(metadata={"setting": setting})


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    dsn: str
    schema: str
    pool_min: int
    pool_max: int


@dataclass(frozen=True, slots=True)
class RabbitMQSettings:
    url: str
    exchange: str
    queue: str
    queue_type: QueueType
    delivery_limit: int


@dataclass(frozen=True, slots=True)
class PubSubSettings:
    """``dead_letter_topic`` and ``dead_letter_subscription`` are resolved: never empty here."""

    project: str
    topic: str
    subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str
    ack_deadline: int
    max_delivery_attempts: int
    retry_min_backoff: float
    retry_max_backoff: float
    max_outstanding_bytes: int
    max_lease_extension: int
    publish_timeout: float


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    enabled: bool
    host: str
    kubeconfig: Path | None
    context: str
    timeout: float
    namespace_labels: list[str]
    deployment_labels: list[str]
    dry_run: bool = _named("dry_run")


@dataclass(frozen=True, slots=True)
class AwsSettings:
    enabled: bool
    region: str
    endpoint_url: str
    archive_bucket: str
    metric_namespace: str
    timeout: float
    max_attempts: int
    dry_run: bool = _named("dry_run")


@dataclass(frozen=True, slots=True)
class ClickHouseSettings:
    enabled: bool
    host: str
    port: int
    database: str
    user: str
    password: SecretStr
    password_file: Path | None
    table: str
    batch_size: int
    flush_interval: float
    buffer_limit: int
    max_body_bytes: int
    timeout: float
    close_timeout: float


@dataclass(frozen=True, slots=True)
class GitHubSettings:
    enabled: bool
    api_url: str
    repository: str
    token: SecretStr
    token_file: Path | None
    min_severity: Severity
    labels: list[str]
    timeout: float


@dataclass(frozen=True, slots=True)
class SlackSettings:
    enabled: bool
    routes: list[SlackRoute]
    default_webhook_url: SecretStr
    default_webhook_url_file: Path | None
    timeout: float


@dataclass(frozen=True, slots=True)
class AiSettings:
    enabled: bool
    provider: AiProvider
    model: str
    base_url: str
    api_key: SecretStr
    api_key_file: Path | None
    json_mode: bool
    region: str
    endpoint_url: str
    min_severity: Severity
    knowledge_dir: Path
    top_k: int
    history: int
    timeout: float
    token_budget: int
    max_output_tokens: int
    max_per_hour: int


@dataclass(frozen=True, slots=True)
class OpsSettings:
    enabled: bool
    host: str
    port: int
    loop_lag_threshold: float


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str
    port: int
    tokens_file: Path | None
    auth: HttpAuth
    max_body_bytes: int
    read_timeout: float
    publish_timeout: float
    retry_after: int
    rate_limit: float
    rate_burst: int
    auth_failure_burst: int
    auth_failure_rate: float
    tokens_reload_interval: float
    dashboard_refresh: int


@dataclass(frozen=True, slots=True)
class MaintenanceSettings:
    batch_size: int
    interval: float
    processed_messages_retention_days: float = _named("processed_messages_retention_days")
    incident_archive_enabled: bool = _named("incident_archive_enabled")
    incident_retention_days: float = _named("incident_retention_days")


# Settings attribute -> (view, prefix). The order is the order of docs/configuration.md.
VIEWS: dict[str, tuple[type[Any], str]] = {
    "postgres": (PostgresSettings, "postgres_"),
    "rabbitmq": (RabbitMQSettings, "rabbitmq_"),
    "pubsub": (PubSubSettings, "pubsub_"),
    "kubernetes": (KubernetesSettings, "kubernetes_"),
    "aws": (AwsSettings, "aws_"),
    "clickhouse": (ClickHouseSettings, "clickhouse_"),
    "github": (GitHubSettings, "github_"),
    "slack": (SlackSettings, "slack_"),
    "ai": (AiSettings, "ai_"),
    "ops": (OpsSettings, "ops_"),
    "http": (HttpSettings, "http_"),
    "maintenance": (MaintenanceSettings, "maintenance_"),
}
