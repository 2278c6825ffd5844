"""incidentd's settings: environment (``INCIDENTD_*``) over a JSON file (``--config``) over defaults.

Settings are flat (``INCIDENTD_RABBITMQ_URL``, not nested) so that every setting has one obvious
environment variable name and one key in the JSON file. They are validated once, at start-up; a bad value
stops the process with one line naming the setting (see :func:`load`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from application.actions import AWS_ACTIONS, KUBERNETES_ACTIONS, ActionRule, rule_names

ENV_PREFIX = "INCIDENTD_"


class SettingsError(Exception):
    """A setting has a bad value; the message names it and says what is expected."""


# --- adapters: Slack routes (issue 6) ---------------------------------------------------------------

RouteKey = Literal["service", "environment", "severity"]


class SlackRoute(BaseModel):
    """Incidents whose fields match every entry of ``match`` (a value or a list of values) go to this
    webhook. Webhook URLs are secrets: give them via the environment or a file, not in a committed
    config file."""

    model_config = ConfigDict(extra="forbid")

    match: dict[RouteKey, str | list[str]] = Field(default_factory=dict)
    webhook_url: SecretStr = SecretStr("")
    webhook_url_file: Path | None = None

    @model_validator(mode="after")
    def _one_webhook(self) -> SlackRoute:
        if bool(self.webhook_url.get_secret_value()) == (self.webhook_url_file is not None):
            raise ValueError("give exactly one of webhook_url or webhook_url_file")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- core ---------------------------------------------------------------------------------------
    broker: Literal["memory", "rabbitmq", "pubsub"] = "memory"
    store: Literal["sqlite", "postgres"] = "sqlite"
    sqlite_path: Path = Path("var/incidentd.db")
    concurrency: int = Field(default=64, ge=1, le=10_000)
    command_timeout: float = Field(default=30.0, gt=0)
    # Per command type, e.g. {"alertmanager.webhook": 10}; env: INCIDENTD_COMMAND_TIMEOUTS='{"...": 10}'
    command_timeouts: dict[str, float] = Field(default_factory=dict)
    max_attempts: int = Field(default=5, ge=1, le=100)
    # Redelivery delay (seconds) after delivery attempt 1, 2, ...; the last value repeats.
    retry_backoff: list[float] = Field(default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0], min_length=1)
    in_process_attempts: int = Field(default=3, ge=1, le=20)
    shutdown_timeout: float = Field(default=25.0, ge=0)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- incidents ----------------------------------------------------------------------------------
    service_labels: list[str] = Field(default_factory=lambda: ["service", "job"])
    environment_labels: list[str] = Field(default_factory=lambda: ["environment", "env"])
    severity_label: str = "severity"
    # Open incidents of the same service and environment within this many seconds share a correlation group.
    correlation_window: float = Field(default=300.0, ge=0)

    # --- PostgreSQL incident store (store=postgres) ------------------------------------------------------
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/test"
    postgres_schema: str = Field(default="", pattern=r"^([a-z_][a-z0-9_]{0,62})?$")  # "" = server default
    postgres_pool_min: int = Field(default=2, ge=1, le=100)
    postgres_pool_max: int = Field(default=10, ge=1, le=100)

    # --- rabbitmq (infra/rabbitmq; docs/rabbitmq.md) ------------------------------------------------
    # Prefetch is derived, not set: 2 x concurrency (capped at 65535), so a slot that frees up finds
    # the next delivery already in the process while the broker sends more.
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    rabbitmq_exchange: str = "incidentd"
    rabbitmq_queue: str = "incidentd"
    rabbitmq_queue_type: Literal["quorum", "classic"] = "quorum"

    # --- pubsub (infra/pubsub; docs/pubsub.md) -----------------------------------------------------
    # Flow control is derived, like RabbitMQ's prefetch: at most 2 x concurrency messages outstanding.
    pubsub_project: str = ""  # required with broker=pubsub (the emulator accepts any name)
    pubsub_topic: str = "incidentd"
    pubsub_subscription: str = "incidentd-worker"
    pubsub_dead_letter_topic: str = ""  # empty: "<pubsub_topic>.dlq"
    pubsub_dead_letter_subscription: str = ""  # empty: "<pubsub_subscription>.dlq" (for `dlq ...`)
    # Set when `setup` creates the subscription; the client extends leases while a handler runs.
    pubsub_ack_deadline: int = Field(default=60, ge=10, le=600)
    # Native dead_letter_policy, a backstop for messages that never reach a handler (0: none); incidentd
    # dead-letters with the reason itself, long before (see docs/pubsub.md).
    pubsub_max_delivery_attempts: int = Field(default=20, ge=0, le=100)
    # The subscription's retry policy for nacks and expired leases (0 and 0: none, redeliver at once).
    pubsub_retry_min_backoff: float = Field(default=1.0, ge=0, le=600)
    pubsub_retry_max_backoff: float = Field(default=10.0, ge=0, le=600)
    pubsub_max_outstanding_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    # The longest single lease extension (and the stream's ack deadline): how long the messages of a
    # worker that died stay invisible before Pub/Sub redelivers them.
    pubsub_max_lease_extension: int = Field(default=60, ge=10, le=600)
    pubsub_publish_timeout: float = Field(default=30.0, gt=0)

    @field_validator("pubsub_project")
    @classmethod
    def _project_for_pubsub(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("broker") == "pubsub" and not value:
            raise ValueError("a project is required when broker is pubsub")
        return value

    @field_validator("pubsub_max_delivery_attempts")
    @classmethod
    def _pubsub_attempts(cls, value: int) -> int:
        if 0 < value < 5:
            raise ValueError("Pub/Sub allows 5 to 100 (or 0: no dead-letter policy)")
        return value

    # --- adapters: Kubernetes and AWS (docs/adapters.md) ----------------------------------------------
    # Actions that change systems (rollout restart, scale, EC2 reboot, Lambda invoke) only log and
    # report what they would do while this is on. Reads, the S3 archive and metrics are unaffected.
    dry_run: bool = False
    kubernetes_enabled: bool = False
    # Credentials: kubernetes_host (no auth; tests and `kubectl proxy`) > kubernetes_kubeconfig >
    # the pod's service account > ~/.kube/config.
    kubernetes_host: str = ""
    kubernetes_kubeconfig: Path | None = None
    kubernetes_context: str = ""
    kubernetes_timeout: float = Field(default=10.0, gt=0)  # seconds, per API call
    aws_enabled: bool = False
    aws_region: str = ""  # empty: the usual AWS chain (AWS_REGION, profile, instance metadata)
    aws_endpoint_url: str = ""  # tests and S3-compatible stores only; empty: AWS's endpoints
    aws_archive_bucket: str = ""  # empty: archiving fails permanently
    aws_metric_namespace: str = "incidentd"
    aws_timeout: float = Field(default=10.0, gt=0)  # seconds, per call including botocore's retries
    aws_max_attempts: int = Field(default=2, ge=1, le=10)  # botocore's own attempts per call

    # --- adapters: ClickHouse event lake, GitHub issues, Slack (docs/adapters-lake-github-slack.md) ---
    clickhouse_enabled: bool = False
    clickhouse_host: str = "127.0.0.1"
    clickhouse_port: int = Field(default=9000, ge=1, le=65535)  # native protocol, not HTTP
    clickhouse_database: str = "default"
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr = SecretStr("")
    clickhouse_password_file: Path | None = None
    clickhouse_table: str = Field(default="incidentd_events", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    clickhouse_batch_size: int = Field(default=1000, ge=1, le=1_000_000)
    clickhouse_flush_interval: float = Field(default=5.0, gt=0)
    # Rows kept while ClickHouse is unreachable; past it the oldest are dropped (and counted).
    clickhouse_buffer_limit: int = Field(default=100_000, ge=1)
    clickhouse_max_body_bytes: int = Field(default=65_536, ge=0)
    clickhouse_timeout: float = Field(default=10.0, gt=0)
    clickhouse_close_timeout: float = Field(default=10.0, ge=0)
    github_enabled: bool = False
    github_api_url: str = "https://api.github.com"
    github_repository: str = Field(default="", pattern=r"^$|^[\w.-]+/[\w.-]+$")  # owner/name
    github_token: SecretStr = SecretStr("")
    github_token_file: Path | None = None
    github_min_severity: Literal["critical", "high", "medium", "low", "info"] = "critical"
    github_labels: list[str] = Field(default_factory=lambda: ["incident"])
    github_timeout: float = Field(default=10.0, gt=0)
    slack_enabled: bool = False
    # First match wins: [{"match": {"service": "api", "severity": ["critical", "high"]},
    #                     "webhook_url_file": "/run/secrets/slack-api"}, ...]
    slack_routes: list[SlackRoute] = Field(default_factory=list)
    slack_default_webhook_url: SecretStr = SecretStr("")
    slack_default_webhook_url_file: Path | None = None
    slack_timeout: float = Field(default=10.0, gt=0)

    # --- handlers' side effects: Kubernetes enrichment and action rules (docs/adapters.md) -------------
    # Alert labels (OEC: alert details) naming the Deployment an alert is about; first present wins.
    kubernetes_namespace_labels: list[str] = Field(default_factory=lambda: ["namespace"], min_length=1)
    kubernetes_deployment_labels: list[str] = Field(default_factory=lambda: ["deployment"], min_length=1)
    # [{"name": "restart-on-label", "labels": {"incidentd_action": "restart"}, "action": "restart"},
    #  {"oec_action": "restartDeployment", "action": "restart"}, ...]; see application/actions.py.
    action_rules: list[ActionRule] = Field(default_factory=list)

    @field_validator("action_rules")
    @classmethod
    def _rules_can_act(cls, rules: list[ActionRule], info: ValidationInfo) -> list[ActionRule]:
        """Unique names; and, unless dry_run, every rule's adapter enabled (else it fails at start-up,
        not when the first incident asks for it)."""
        names = rule_names(rules)
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        needs = {"kubernetes_enabled": KUBERNETES_ACTIONS, "aws_enabled": AWS_ACTIONS}
        for name, rule in zip(names, rules, strict=True):
            for flag, kinds in needs.items():
                if rule.action in kinds and not info.data.get(flag) and not info.data.get("dry_run"):
                    raise ValueError(f"rule {name!r} ({rule.action}) needs {flag} (or dry_run)")
        return rules

    @field_validator("clickhouse_buffer_limit")
    @classmethod
    def _buffer_holds_a_batch(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("clickhouse_batch_size", 0):
            raise ValueError("must be at least clickhouse_batch_size")
        return value

    @field_validator("github_repository")
    @classmethod
    def _repository_when_enabled(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("github_enabled") and not value:
            raise ValueError("owner/name is required when github_enabled is true")
        return value

    @field_validator("github_token_file")
    @classmethod
    def _token_when_enabled(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        token = info.data.get("github_token")
        if info.data.get("github_enabled") and value is None and not (token and token.get_secret_value()):
            raise ValueError("github_token or github_token_file is required when github_enabled is true")
        return value

    # --- ops server (probes and metrics; see docs/operations.md) -------------------------------------
    ops_enabled: bool = True
    # 0.0.0.0 so the kubelet and Prometheus reach the pod IP; bind 127.0.0.1 when running outside a pod.
    ops_host: str = "0.0.0.0"
    ops_port: int = Field(default=8080, ge=0, le=65535)
    # /healthz fails once the event loop runs its watchdog timer this many seconds late (a blocked loop).
    ops_loop_lag_threshold: float = Field(default=10.0, gt=0)

    # --- HTTP ingest (infra/web; docs/ingest.md) --------------------------------------------------------
    # The webhook front door of `app.py ingest` and `app.py run`; its probes and /metrics stay on ops_port.
    http_host: str = "0.0.0.0"  # `run` binds 127.0.0.1 unless this is set explicitly
    http_port: int = Field(default=8000, ge=0, le=65535)
    # Lines NAME:TOKEN or NAME:TOKEN:ROLE[,ROLE] (roles ingest, read, write; none given = all); re-read
    # when the file changes and on SIGHUP.
    http_tokens_file: Path | None = None
    # "none": serve without authentication even on a real broker or a non-loopback address (behind a
    # mesh that authenticates). Without a tokens file and without this, `ingest` refuses to start.
    http_auth: Literal["tokens", "none"] = "tokens"
    # 5 MiB holds an Alertmanager batch of 1,000 alerts (~1.5 KB each) and stays under Pub/Sub's 10 MB.
    http_max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, le=9 * 1024 * 1024)
    http_read_timeout: float = Field(default=10.0, gt=0)  # seconds to receive a request's body
    # Seconds to wait for the broker's confirm before answering 503 (the sender retries).
    http_publish_timeout: float = Field(default=10.0, gt=0)
    http_retry_after: int = Field(default=5, ge=1, le=3600)  # the Retry-After of a 503, in seconds
    http_rate_limit: float = Field(default=100.0, ge=0)  # requests per second per token (0: no limit)
    http_rate_burst: int = Field(default=500, ge=1)  # requests a token may send at once
    http_tokens_reload_interval: float = Field(default=5.0, gt=0)  # seconds between checks of the file
    # The dashboard (`serve`, `run`; docs/api.md) reloads its data this often, in seconds (0: never).
    http_dashboard_refresh: int = Field(default=15, ge=0, le=3600)

    @field_validator("http_auth")
    @classmethod
    def _auth_or_tokens(cls, value: str, info: ValidationInfo) -> str:
        if value == "none" and info.data.get("http_tokens_file") is not None:
            raise ValueError("'none' contradicts http_tokens_file; set one of them")
        return value

    @field_validator("retry_backoff")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError("delays must be >= 0")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init_settings carries the JSON file's values (see load); the environment wins over them.
        return (env_settings, init_settings)


def load(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise SettingsError naming the first bad setting."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SettingsError(f"cannot read config file {config_file}: {exc}") from None
        if not isinstance(values, dict):
            raise SettingsError(f"config file {config_file} must hold a JSON object")
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0]) if error["loc"] else "?"
        raise SettingsError(
            f"invalid setting {ENV_PREFIX}{name.upper()} ({name!r} in the config file): {error['msg']}"
        ) from None
