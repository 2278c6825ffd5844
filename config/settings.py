"""incidentd's settings: environment (``INCIDENTD_*``) over files in ``INCIDENTD_SECRETS_DIR`` over a JSON
file (``--config``) over defaults.

Settings are flat (``INCIDENTD_RABBITMQ_URL``, not nested) so that every setting has one obvious
environment variable name, one key in the JSON file and one file name in the secrets directory
(``incidentd_rabbitmq_url``: a mounted Kubernetes Secret). They are validated once, at start-up; every bad
value, unknown ``INCIDENTD_*`` name and undecodable JSON value is reported at once, one line each, naming
the setting, where it came from and (for lists and maps) the place inside it (see :func:`load`).
Adapters read their own group as a typed view (``settings.clickhouse``: config/views.py). Every field
carries its description, from which docs/configuration.md is generated (config/docs.py).
"""

from __future__ import annotations

import contextvars
import difflib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as SourceError

from application.actions import AWS_ACTIONS, KUBERNETES_ACTIONS, ActionRule, rule_names
from common.extras import missing_extras
from common.redact import redact, register_secret
from config.views import (
    AiProvider,
    AiSettings,
    AwsSettings,
    ClickHouseSettings,
    GitHubSettings,
    HttpAuth,
    HttpSettings,
    KubernetesSettings,
    MaintenanceSettings,
    OpsSettings,
    PostgresSettings,
    PubSubSettings,
    QueueType,
    RabbitMQSettings,
    Severity,
    SlackSettings,
    view_of,
)

ENV_PREFIX = "INCIDENTD_"


class SettingsError(Exception):
    """Settings with bad values; each of ``problems`` is one line naming a setting and what is wrong."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else problems
        super().__init__("\n".join(self.problems))


def url_problem(value: str, schemes: tuple[str, ...], *, host: bool = True) -> str | None:
    """Why ``value`` is not a usable URL with one of ``schemes`` (None when it is). Never quotes the value:
    URLs here carry passwords and webhook tokens."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in schemes:
        # "user:password@host" parses as scheme "user": name a scheme only when it is one.
        shown = f"'{parts.scheme}'" if parts.scheme and "://" in value else "none"
        return f"URL scheme must be {' or '.join(schemes)} (found {shown})"
    if host and not parts.hostname:
        return "URL has no host"
    return None


def _check_url(value: str, schemes: tuple[str, ...], *, host: bool = True) -> None:
    problem = url_problem(value, schemes, host=host)
    if problem:
        raise ValueError(problem)


HTTP = ("https", "http")


# --- adapters: Slack routes ---------------------------------------------------------------------

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

    @field_validator("webhook_url")
    @classmethod
    def _webhook_is_a_url(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            _check_url(value.get_secret_value(), HTTP)
        return value


class Settings(BaseSettings):
    """Every setting, flat; ``settings.<group>`` gives an adapter its own typed, read-only view
    (config/views.py). Field rules sit on the fields; rules between fields are in :meth:`_consistent`,
    which runs once every value is valid on its own, whatever the declaration order."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- core ---------------------------------------------------------------------------------------
    broker: Literal["memory", "rabbitmq", "pubsub"] = Field(
        "memory", description="`memory` (in-process, for local runs and tests), `rabbitmq` or `pubsub`."
    )
    store: Literal["sqlite", "postgres"] = Field("sqlite", description="`sqlite` (embedded) or `postgres`.")
    sqlite_path: Path = Field(
        Path("var/incidentd.db"),
        description="The SQLite file: incidents, and the memory broker's dead letters.",
    )
    concurrency: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Handlers running at once per worker; the broker's prefetch (RabbitMQ) and flow "
        "control (Pub/Sub) are 2 x this.",
    )
    command_timeout: float = Field(
        30.0, gt=0, description="Seconds a command's handlers may take, in-process retries included."
    )
    command_timeouts: dict[str, float] = Field(
        default_factory=dict,
        description='Per command type, e.g. `{"alertmanager.webhook": 10}`; the others get '
        "`command_timeout`.",
    )
    max_attempts: int = Field(
        5, ge=1, le=100, description="Deliveries before a transiently failing message is dead-lettered."
    )
    retry_backoff: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0],
        min_length=1,
        description="Redelivery delay in seconds after delivery attempt 1, 2, ...; the last value repeats.",
    )
    in_process_attempts: int = Field(
        3, ge=1, le=20, description="Tries within one delivery for a `TransientError`."
    )
    shutdown_timeout: float = Field(
        25.0,
        ge=0,
        description="The worker's whole shutdown after SIGTERM, in seconds, split (application/worker.py): "
        "a fifth (at most 10 s) for settles under way, a fifth (at most 5 s) for the broker's close, the "
        "rest for running handlers.",
    )
    log_format: Literal["json", "console"] = Field(
        "json", description="`json` (one object per line on stderr) or `console`; any case."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Any case; client libraries log only warnings and errors unless `debug`."
    )
    log_repeat_window: float = Field(
        10.0,
        ge=0,
        description="Identical warning / error lines within this many seconds are written once, the next "
        'one carrying `"repeated": N` (`0`: write every line).',
    )
    startup_timeout: float = Field(
        60.0,
        ge=0,
        description="Seconds `worker` and `setup` keep trying to reach the broker and the store at start-up.",
    )
    secrets_dir: Path | None = Field(
        None,
        description="A directory of settings as files named like the variables (`incidentd_rabbitmq_url`, "
        "any case), e.g. a mounted Kubernetes Secret. Only from the environment or the config file.",
    )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("retry_backoff")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError("delays must be >= 0")
        return value

    # --- incidents ----------------------------------------------------------------------------------
    service_labels: list[str] = Field(
        default_factory=lambda: ["service", "job"],
        description="Alert labels naming the service; the first present wins.",
    )
    environment_labels: list[str] = Field(
        default_factory=lambda: ["environment", "env"],
        description="Alert labels naming the environment; the first present wins.",
    )
    severity_label: str = Field("severity", description="The alert label naming the severity.")
    correlation_window: float = Field(
        300.0,
        ge=0,
        description="Open incidents of the same service and environment within this many seconds share a "
        "correlation group.",
    )

    # --- PostgreSQL incident store (store=postgres; docs/incidents.md) -------------------------------
    postgres_dsn: str = Field(
        "postgresql://postgres@127.0.0.1:5432/test",
        description="asyncpg DSN (`postgresql://` or `postgres://`; the host may be a `?host=` socket).",
    )
    postgres_schema: str = Field(
        "",
        pattern=r"^([a-z_][a-z0-9_]{0,62})?$",
        description="A schema of its own, created if missing; empty: the server's `search_path`.",
    )
    postgres_pool_min: int = Field(2, ge=1, le=100, description="Connections the pool keeps open.")
    postgres_pool_max: int = Field(10, ge=1, le=100, description="Most connections the pool opens.")

    @field_validator("postgres_dsn")
    @classmethod
    def _postgres_dsn(cls, value: str) -> str:
        _check_url(value, ("postgresql", "postgres"), host=False)  # host may be in ?host= (a socket)
        return value

    # --- RabbitMQ (broker=rabbitmq; docs/rabbitmq.md) -----------------------------------------------
    # Prefetch is derived, not set: 2 x concurrency (capped at 65535), so a slot that frees up finds
    # the next delivery already in the process while the broker sends more.
    rabbitmq_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="AMQP URL (`amqp://` or `amqps://`); aio-pika's URL options work, e.g. `?heartbeat=30`.",
    )
    rabbitmq_exchange: str = Field("incidentd", description="The topic exchange publishers send to.")
    rabbitmq_queue: str = Field(
        "incidentd", description="The main queue; `<queue>.retry.<ms>ms` and `<queue>.dlq` derive from it."
    )
    rabbitmq_queue_type: QueueType = Field(
        "quorum", description="`quorum` (replicated, counts deliveries) or `classic`."
    )
    # incidentd's own attempts are counted separately (x-incidentd-attempt); this is the backstop for a
    # message that kills the consumer before incidentd can settle it.
    rabbitmq_delivery_limit: int = Field(
        20,
        ge=1,
        le=10_000,
        description="Quorum queues: deliveries of one message (returns on a dropped channel included) "
        "before RabbitMQ dead-letters it to `<queue>.dlq` itself.",
    )

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        _check_url(value, ("amqp", "amqps"))
        return value

    # --- Google Pub/Sub (broker=pubsub; docs/pubsub.md) ---------------------------------------------
    # Flow control is derived, like RabbitMQ's prefetch: at most 2 x concurrency messages outstanding.
    pubsub_project: str = Field(
        "", description="The Google Cloud project; required with `broker=pubsub` (any name on the emulator)."
    )
    pubsub_topic: str = Field("incidentd", description="The topic publishers send to.")
    pubsub_subscription: str = Field("incidentd-worker", description="The workers' subscription.")
    pubsub_dead_letter_topic: str = Field(
        "", description="Where dead letters are published; empty: `<pubsub_topic>.dlq`."
    )
    pubsub_dead_letter_subscription: str = Field(
        "", description="What `dlq ...` reads; empty: `<pubsub_subscription>.dlq`."
    )
    pubsub_ack_deadline: int = Field(
        60,
        ge=10,
        le=600,
        description="Seconds; set when `setup` creates the subscription (leases are extended while a "
        "handler runs).",
    )
    # incidentd dead-letters with the reason itself long before this backstop (see docs/pubsub.md).
    pubsub_max_delivery_attempts: int = Field(
        20,
        ge=0,
        le=100,
        description="The subscription's native `dead_letter_policy`, a backstop for messages that never "
        "reach a handler: 5 to 100, or `0` for none.",
    )
    pubsub_retry_min_backoff: float = Field(
        1.0,
        ge=0,
        le=600,
        description="Seconds; the subscription's retry policy for nacks and expired leases (`0` and `0`: "
        "none, redeliver at once).",
    )
    pubsub_retry_max_backoff: float = Field(
        10.0, ge=0, le=600, description="Seconds; the retry policy's longest delay."
    )
    pubsub_max_outstanding_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Flow control: bytes of messages held at once."
    )
    pubsub_max_lease_extension: int = Field(
        60,
        ge=10,
        le=600,
        description="Seconds; the longest single lease extension: how long the messages of a worker that "
        "died stay invisible before Pub/Sub redelivers them.",
    )
    pubsub_publish_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds to wait for a publish (the CLI, retry and dead-letter copies, replays).",
    )

    @field_validator("pubsub_max_delivery_attempts")
    @classmethod
    def _pubsub_attempts(cls, value: int) -> int:
        if 0 < value < 5:
            raise ValueError("Pub/Sub allows 5 to 100 (or 0: no dead-letter policy)")
        return value

    # --- Kubernetes and AWS adapters (docs/adapters.md) ---------------------------------------------
    dry_run: bool = Field(
        False,
        description="Actions that change systems (rollout restart, scale, EC2 reboot, Lambda invoke) only "
        "check the call and report what they would do. Reads, the S3 archive and metrics are unaffected.",
    )
    kubernetes_enabled: bool = Field(
        False, description="Enrich incidents from, and act on, Kubernetes Deployments."
    )
    # Credentials: kubernetes_host > kubernetes_kubeconfig > the pod's service account > ~/.kube/config.
    kubernetes_host: str = Field(
        "",
        description="An API URL used without credentials (`kubectl proxy`, tests); wins over the "
        "kubeconfig and the service account.",
    )
    kubernetes_kubeconfig: Path | None = Field(
        None, description="A kubeconfig file; unset: the pod's service account, else `~/.kube/config`."
    )
    kubernetes_context: str = Field("", description="The kubeconfig context; empty: the file's current one.")
    kubernetes_timeout: float = Field(10.0, gt=0, description="Seconds per API call.")
    kubernetes_namespace_labels: list[str] = Field(
        default_factory=lambda: ["namespace"],
        min_length=1,
        description="Alert labels (OEC: alert details) naming the namespace; first present wins.",
    )
    kubernetes_deployment_labels: list[str] = Field(
        default_factory=lambda: ["deployment"],
        min_length=1,
        description="Alert labels (OEC: alert details) naming the Deployment; first present wins.",
    )
    aws_enabled: bool = Field(
        False, description="EC2 describe and reboot, the S3 archive, CloudWatch metrics, Lambda invoke."
    )
    aws_region: str = Field(
        "", description="Empty: the usual AWS chain (`AWS_REGION`, the profile, instance metadata)."
    )
    aws_endpoint_url: str = Field(
        "", description="Send every call here instead of AWS's endpoints (tests, S3-compatible stores)."
    )
    aws_archive_bucket: str = Field(
        "", description="The S3 bucket for incident archives; empty: archiving fails permanently."
    )
    aws_metric_namespace: str = Field("incidentd", description="The CloudWatch namespace of `put_metric`.")
    aws_timeout: float = Field(10.0, gt=0, description="Seconds per call, botocore's retries included.")
    aws_max_attempts: int = Field(
        2, ge=1, le=10, description="botocore's own attempts per call; the dispatcher retries on top."
    )

    @field_validator("github_api_url", "kubernetes_host", "aws_endpoint_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value:
            _check_url(value, HTTP)
        return value

    # --- ClickHouse event lake, GitHub issues, Slack (docs/adapters-lake-github-slack.md) ----------------
    clickhouse_enabled: bool = Field(False, description="Write one row per processed message to ClickHouse.")
    clickhouse_host: str = Field("127.0.0.1", description="The ClickHouse server.")
    clickhouse_port: int = Field(
        9000, ge=1, le=65535, description="The **native** protocol port (not HTTP's 8123)."
    )
    clickhouse_database: str = Field("default", description="The database; it must exist.")
    clickhouse_user: str = Field("default", description="The user.")
    clickhouse_password: SecretStr = Field(SecretStr(""), description="The password.")
    clickhouse_password_file: Path | None = Field(None, description="A file holding the password.")
    clickhouse_table: str = Field(
        "incidentd_events",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The table, created on the first flush if missing.",
    )
    clickhouse_batch_size: int = Field(
        1000, ge=1, le=1_000_000, description="A flush starts once this many rows are waiting."
    )
    clickhouse_flush_interval: float = Field(
        5.0, gt=0, description="Seconds; a partial batch is flushed at least this often."
    )
    clickhouse_buffer_limit: int = Field(
        100_000,
        ge=1,
        description="Rows kept while ClickHouse is unreachable (at least `clickhouse_batch_size`); past "
        "it the oldest are dropped and counted.",
    )
    clickhouse_max_body_bytes: int = Field(65_536, ge=0, description="Message bodies are cut to this length.")
    clickhouse_timeout: float = Field(10.0, gt=0, description="Seconds for connecting plus one insert.")
    clickhouse_close_timeout: float = Field(
        10.0, ge=0, description="Seconds, at shutdown, to keep trying to flush the rest."
    )
    github_enabled: bool = Field(
        False, description="Open a GitHub issue per incident at or above the severity."
    )
    github_api_url: str = Field(
        "https://api.github.com", description="The API (GitHub Enterprise: `https://HOST/api/v3`)."
    )
    github_repository: str = Field(
        "",
        pattern=r"^$|^[\w.-]+/[\w.-]+$",
        description="`owner/name` the issues are opened in; required when enabled.",
    )
    github_token: SecretStr = Field(
        SecretStr(""), description="A token with `issues: write`; this or the file is required when enabled."
    )
    github_token_file: Path | None = Field(None, description="A file holding the token.")
    github_min_severity: Severity = Field(
        "critical", description="Incidents at this severity or above get an issue."
    )
    github_labels: list[str] = Field(
        default_factory=lambda: ["incident"],
        description="Labels on every issue; `severity:<level>` is added to them.",
    )
    github_timeout: float = Field(10.0, gt=0, description="Seconds per request.")
    slack_enabled: bool = Field(False, description="Post one Slack message per incident transition.")
    slack_routes: list[SlackRoute] = Field(
        default_factory=list,
        description='First match wins: `[{"match": {"service": "api", "severity": ["critical"]}, '
        '"webhook_url_file": "/run/secrets/slack-api"}]`; `match` keys are `service`, `environment`, '
        "`severity`; give `webhook_url` or `webhook_url_file`.",
    )
    slack_default_webhook_url: SecretStr = Field(
        SecretStr(""), description="The webhook when no route matches; with neither, nothing is sent."
    )
    slack_default_webhook_url_file: Path | None = Field(None, description="A file holding that webhook.")
    slack_timeout: float = Field(10.0, gt=0, description="Seconds per request.")

    @field_validator("slack_default_webhook_url")
    @classmethod
    def _webhook_url(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            _check_url(value.get_secret_value(), HTTP)
        return value

    # --- action rules (docs/adapters.md#action-rules) -----------------------------------------------
    action_rules: list[ActionRule] = Field(
        default_factory=list,
        description='Events to actions: `[{"name": "restart-on-label", "labels": {"incidentd_action": '
        '"restart"}, "action": "restart"}]`; each rule\'s adapter must be enabled (or `dry_run`).',
    )

    @field_validator("action_rules")
    @classmethod
    def _unique_rule_names(cls, rules: list[ActionRule]) -> list[ActionRule]:
        names = rule_names(rules)
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        return rules

    # --- AI analysis of incidents (docs/ai.md); off by default ----------------------------------------
    ai_enabled: bool = Field(
        False, description="Analyse incidents with a chat model; off, nothing of it is imported."
    )
    ai_provider: AiProvider = Field(
        "openai",
        description="`openai` (any OpenAI-compatible endpoint) or `bedrock` (Converse, the AWS chain).",
    )
    ai_model: str = Field(
        "", description='Required when enabled: e.g. `"llama3.1:8b"` (Ollama), a Bedrock model or profile id.'
    )
    ai_base_url: str = Field(
        "", description="openai: the endpoint's base URL, e.g. `http://127.0.0.1:11434/v1`; required."
    )
    ai_api_key: SecretStr = Field(
        SecretStr(""), description="openai: sent as a Bearer token; none for a local endpoint."
    )
    ai_api_key_file: Path | None = Field(None, description="A file holding the API key.")
    ai_json_mode: bool = Field(
        True, description='openai: ask for `response_format` `{"type": "json_object"}`.'
    )
    ai_region: str = Field("", description="bedrock: the region; empty: the usual AWS chain.")
    ai_endpoint_url: str = Field("", description="bedrock: another endpoint (tests only).")
    ai_min_severity: Severity = Field(
        "high", description="Incidents opening at or above it are analysed automatically."
    )
    ai_knowledge_dir: Path = Field(
        Path("runbooks"), description="Markdown runbooks, indexed with BM25, re-indexed when they change."
    )
    ai_top_k: int = Field(3, ge=0, le=20, description="Runbook passages in the prompt.")
    ai_history: int = Field(5, ge=0, le=50, description="Previous resolved incidents in the prompt.")
    ai_timeout: float = Field(
        60.0,
        gt=0,
        le=600,
        description="Seconds per model call; `incident.analyze` gets `2 x ai_timeout + 30` unless "
        "`command_timeouts` sets one.",
    )
    ai_token_budget: int = Field(
        12_000,
        ge=1_000,
        le=1_000_000,
        description="Tokens per analysis, prompt and answer, the one retry included; at least 3 x "
        "`ai_max_output_tokens`.",
    )
    ai_max_output_tokens: int = Field(1_000, ge=100, le=100_000, description="The answer's limit.")
    ai_max_per_hour: int = Field(
        30, ge=0, le=100_000, description="Analyses calling the model, per worker process and hour."
    )

    # --- ops server (probes and metrics; docs/operations.md) -----------------------------------------
    ops_enabled: bool = Field(
        True, description="Serve `/healthz`, `/readyz` and `/metrics` from `worker` (not with `--from`)."
    )
    ops_host: str = Field(
        "0.0.0.0",
        description="`0.0.0.0` so the kubelet and Prometheus reach the pod IP; `127.0.0.1` outside a pod.",
    )
    ops_port: int = Field(8080, ge=0, le=65535, description="The ops port (`0`: a free one).")
    ops_loop_lag_threshold: float = Field(
        10.0, gt=0, description="Seconds the event loop may run late before `/healthz` fails."
    )

    # --- HTTP ingest, incident API and dashboard (docs/ingest.md, docs/api.md) ----------------------
    http_host: str = Field(
        "0.0.0.0", description="Where `ingest` and `run` listen (`run`: `127.0.0.1` unless set)."
    )
    http_port: int = Field(8000, ge=0, le=65535, description="The HTTP port (`0`: a free one).")
    http_tokens_file: Path | None = Field(
        None,
        description="Lines `NAME:TOKEN` or `NAME:TOKEN:ROLE[,ROLE]` (roles `ingest`, `read`, `write`; none: "
        "all); re-read when it changes and on SIGHUP. Without it (or `http_auth=none`) `ingest` refuses "
        "to start.",
    )
    http_auth: HttpAuth = Field(
        "tokens",
        description="`none`: serve without authentication even on a real broker or a non-loopback address "
        "(behind a mesh that authenticates).",
    )
    http_max_body_bytes: int = Field(
        5 * 1024 * 1024,
        ge=1024,
        le=9 * 1024 * 1024,
        description="Larger bodies get 413; the default holds a 1,000-alert Alertmanager batch and stays "
        "under Pub/Sub's 10 MB.",
    )
    http_read_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds to receive a request's headers (else the connection is closed) and, "
        "again, its body (408).",
    )
    http_publish_timeout: float = Field(
        10.0, gt=0, description="Seconds to wait for the broker's confirm before answering 503."
    )
    http_retry_after: int = Field(5, ge=1, le=3600, description="The `Retry-After` of a 503, in seconds.")
    http_rate_limit: float = Field(100.0, ge=0, description="Requests per second per token (`0`: no limit).")
    http_rate_burst: int = Field(500, ge=1, description="Requests a token may send at once.")
    http_auth_failure_burst: int = Field(
        10,
        ge=1,
        description="Failed authentications a peer address may have at once; past them (and the "
        "refill), 429 with `Retry-After`, the token not even checked.",
    )
    http_auth_failure_rate: float = Field(
        0.2, ge=0, description="Failed authentications per second refilled per peer address (`0`: no limit)."
    )
    http_tokens_reload_interval: float = Field(
        5.0, gt=0, description="Seconds between checks of the tokens file."
    )
    http_dashboard_refresh: int = Field(
        15, ge=0, le=3600, description="Seconds between the dashboard's reloads of its data (`0`: never)."
    )

    # --- maintenance: retention and archival (docs/operations.md#retention) ---------------------------
    # A key pruned before a broker can hand the message back (redelivery, a Pub/Sub seek over up to 31
    # days of retention, a dead letter replayed later) lets that copy apply twice.
    processed_messages_retention_days: float = Field(
        45.0,
        ge=0,
        description="Idempotency keys older than this are deleted (`0`: kept for ever). Keep it above the "
        "longest time a message can come back.",
    )
    incident_archive_enabled: bool = Field(
        False,
        description="Archive resolved incidents to S3, then delete them; needs `aws_enabled` and "
        "`aws_archive_bucket`.",
    )
    incident_retention_days: float = Field(
        90.0, gt=0, description="A resolved incident is archived once its last event is this old."
    )
    maintenance_batch_size: int = Field(
        5000, ge=1, le=1_000_000, description="Rows deleted per transaction (no long locks)."
    )
    maintenance_interval: float = Field(
        3600.0,
        ge=0,
        description="Seconds between the worker's maintenance runs (one pod at a time); `0`: never (run "
        "`app.py maintenance`, e.g. the CronJob in deploy/).",
    )

    # --- rules between settings -----------------------------------------------------------------------
    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Every rule between settings, judged on valid values; all broken rules are reported at once,
        each naming its setting. Then the defaults that derive from other settings."""
        conflicts = list(_conflicts(self))
        if conflicts:
            raise Conflicts(conflicts)
        if self.ai_enabled:  # incident.analyze may take two model calls: unless its timeout is set
            self.command_timeouts.setdefault("incident.analyze", 2 * self.ai_timeout + 30)
        return self

    # --- typed views, one per adapter or server (config/views.py) -------------------------------------
    @property
    def postgres(self) -> PostgresSettings:
        return view_of(PostgresSettings, self, "postgres_")

    @property
    def rabbitmq(self) -> RabbitMQSettings:
        return view_of(RabbitMQSettings, self, "rabbitmq_")

    @property
    def pubsub(self) -> PubSubSettings:
        view = view_of(PubSubSettings, self, "pubsub_")
        return replace(
            view,
            dead_letter_topic=view.dead_letter_topic or f"{view.topic}.dlq",
            dead_letter_subscription=view.dead_letter_subscription or f"{view.subscription}.dlq",
        )

    @property
    def kubernetes(self) -> KubernetesSettings:
        return view_of(KubernetesSettings, self, "kubernetes_")

    @property
    def aws(self) -> AwsSettings:
        return view_of(AwsSettings, self, "aws_")

    @property
    def clickhouse(self) -> ClickHouseSettings:
        return view_of(ClickHouseSettings, self, "clickhouse_")

    @property
    def github(self) -> GitHubSettings:
        return view_of(GitHubSettings, self, "github_")

    @property
    def slack(self) -> SlackSettings:
        return view_of(SlackSettings, self, "slack_")

    @property
    def ai(self) -> AiSettings:
        return view_of(AiSettings, self, "ai_")

    @property
    def ops(self) -> OpsSettings:
        return view_of(OpsSettings, self, "ops_")

    @property
    def http(self) -> HttpSettings:
        return view_of(HttpSettings, self, "http_")

    @property
    def maintenance(self) -> MaintenanceSettings:
        return view_of(MaintenanceSettings, self, "maintenance_")

    def needed_extras(self) -> list[tuple[str, str]]:
        """(the setting that asks, the pip extra it needs) for every optional client library in use."""
        needs: list[tuple[str, str]] = []
        if self.broker != "memory":
            needs.append((f"INCIDENTD_BROKER={self.broker}", self.broker))
        if self.store == "postgres":
            needs.append(("INCIDENTD_STORE=postgres", "postgres"))
        for adapter in ("kubernetes", "aws", "clickhouse", "github", "ai"):
            if getattr(self, f"{adapter}_enabled"):
                needs.append((f"INCIDENTD_{adapter.upper()}_ENABLED=true", adapter))
        if self.ai_enabled and self.ai_provider == "bedrock" and not self.aws_enabled:
            needs.append(("INCIDENTD_AI_PROVIDER=bedrock", "aws"))
        return needs

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init_settings carries the JSON file's values (see load); the secrets directory wins over them,
        # the environment over both.
        secrets_dir = getattr(file_secret_settings, "secrets_dir", None)
        return (_Env(settings_cls), _Secrets(settings_cls, secrets_dir=secrets_dir), init_settings)


# --- rules between settings ------------------------------------------------------------------------------


class Conflicts(ValueError):
    """Broken rules between settings, each (the setting to change, why): load() reports one line each,
    like a bad value."""

    def __init__(self, conflicts: list[tuple[str, str]]) -> None:
        self.conflicts = conflicts
        super().__init__("; ".join(f"{name}: {why}" for name, why in conflicts))


def _conflicts(s: Settings) -> Iterator[tuple[str, str]]:
    """(setting, problem) for each rule between settings that ``s`` breaks."""
    if s.broker == "pubsub" and not s.pubsub_project:
        yield "pubsub_project", "a project is required when broker is pubsub"
    yield from _rules_without_adapter(s)
    if s.clickhouse_buffer_limit < s.clickhouse_batch_size:
        yield "clickhouse_buffer_limit", "must be at least clickhouse_batch_size"
    if s.github_enabled and not s.github_repository:
        yield "github_repository", "owner/name is required when github_enabled is true"
    if s.github_enabled and s.github_token_file is None and not s.github_token.get_secret_value():
        yield "github_token_file", "github_token or github_token_file is required when github_enabled is true"
    if s.ai_enabled and not s.ai_model:
        yield "ai_model", "a model is required when ai_enabled is true"
    if s.ai_enabled and s.ai_provider == "openai" and not s.ai_base_url:
        yield "ai_base_url", "the endpoint's base URL is required when ai_provider is openai"
    if s.ai_token_budget < 3 * s.ai_max_output_tokens:
        yield "ai_max_output_tokens", "ai_token_budget must be at least 3 x ai_max_output_tokens"
    if s.http_auth == "none" and s.http_tokens_file is not None:
        yield "http_auth", "'none' contradicts http_tokens_file; set one of them"
    if s.incident_archive_enabled and not (s.aws_enabled and s.aws_archive_bucket):
        yield "incident_archive_enabled", "archiving incidents needs aws_enabled and aws_archive_bucket"


def _rules_without_adapter(s: Settings) -> Iterator[tuple[str, str]]:
    """Unless dry_run, an action rule whose adapter is off fails at start-up, not when the first
    incident asks for it."""
    if s.dry_run:
        return
    needs = {"kubernetes_enabled": KUBERNETES_ACTIONS, "aws_enabled": AWS_ACTIONS}
    for name, rule in zip(rule_names(s.action_rules), s.action_rules, strict=True):
        for flag, kinds in needs.items():
            if rule.action in kinds and not getattr(s, flag):
                yield "action_rules", f"rule {name!r} ({rule.action}) needs {flag} (or dry_run)"


# --- loading: every problem at once, one line each ----------------------------------------------------

# Undecodable JSON values seen by the sources of the load() under way: field name -> problem.
_bad_json: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("bad_json")


class _RecordBadJson:  # a mixin for the two sources below
    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        """Bad JSON is one more problem to report with the others, not an exception ending the load."""
        try:
            return super().decode_complex_value(field_name, field, value)  # type: ignore[misc]
        except ValueError as exc:
            _bad_json.get({}).setdefault(field_name, f"not valid JSON ({exc})")
            return value  # fails validation too; load() reports the JSON problem in its place


class _Env(_RecordBadJson, EnvSettingsSource):
    pass


class _Secrets(_RecordBadJson, SecretsSettingsSource):
    pass


def _env_names() -> dict[str, str]:
    """``INCIDENTD_*`` variables of the environment: upper-cased name -> name as given."""
    return {name.upper(): name for name in os.environ if name.upper().startswith(ENV_PREFIX)}


def _service_links(names: set[str]) -> set[str]:
    """The variables Kubernetes adds for each Service of the namespace (``enableServiceLinks``): for a
    Service ``incidentd-metrics``, ``INCIDENTD_METRICS_SERVICE_HOST``, ``..._PORT``, ``..._PORT_8080_TCP``...
    Recognised by their ``_SERVICE_HOST`` anchor, so a typo ending in ``_PORT`` is still reported."""
    bases = [n.removesuffix("_SERVICE_HOST") for n in names if n.endswith("_SERVICE_HOST")]
    return {
        n for n in names for b in bases
        if n == f"{b}_SERVICE_HOST" or n.startswith(f"{b}_SERVICE_PORT") or n == f"{b}_PORT"
        or n.startswith(f"{b}_PORT_")
    }  # fmt: skip


def _closest(name: str, as_key: bool = False) -> str:
    match = difflib.get_close_matches(name, list(Settings.model_fields), n=1, cutoff=0.6)
    if not match:
        return ""
    return f"; did you mean {match[0]!r}?" if as_key else f"; did you mean {ENV_PREFIX}{match[0].upper()}?"


def _unknown_names(secrets_dir: Path | None) -> list[str]:
    """A misspelt ``INCIDENTD_*`` variable (or secrets-directory file) would be ignored silently."""
    problems = []
    names = set(_env_names())
    ignored = _service_links(names)
    for name in sorted(names - ignored):
        field = name.removeprefix(ENV_PREFIX).lower()
        # INCIDENTD_TEST_*: the test suite's own variables (tests/incidents/conftest.py), not settings.
        if field not in Settings.model_fields and not field.startswith("test_"):
            problems.append(f"unknown setting {name} in the environment{_closest(field)}")
    if secrets_dir is not None and secrets_dir.is_dir():
        for path in sorted(secrets_dir.iterdir()):
            field = path.name.lower().removeprefix(ENV_PREFIX.lower())
            if path.name.upper().startswith(ENV_PREFIX) and field not in Settings.model_fields:
                problems.append(f"unknown setting file {path}{_closest(field)}")
    return problems


def origins(values: dict[str, Any], secrets_dir: Path | None, config_file: Path | None) -> dict[str, str]:
    """Where each setting's value comes from: ``environment``, ``secrets file PATH``, ``config file PATH``,
    ``override`` (a command-line choice) or ``default``."""
    env = _env_names()
    files = {}
    if secrets_dir is not None and secrets_dir.is_dir():
        files = {p.name.upper(): p for p in secrets_dir.iterdir() if p.is_file()}
    found = {}
    for field in Settings.model_fields:
        name = ENV_PREFIX + field.upper()
        if name in env:
            found[field] = "environment"
        elif name in files:
            found[field] = f"secrets file {files[name]}"
        elif field in values:
            found[field] = f"config file {config_file}" if config_file is not None else "override"
        else:
            found[field] = "default"
    return found


def _problem(error: Any, where: dict[str, str], bad_json: dict[str, str]) -> str:
    loc = [str(part) for part in error["loc"]]
    field = loc[0] if loc else "?"
    origin = where.get(field, "config file")
    if error["type"] == "extra_forbidden":
        return f"unknown setting {field!r} ({origin}){_closest(field, as_key=True)}"
    name = f"{ENV_PREFIX}{field.upper()}"
    inside = f" at {'.'.join(loc)}" if len(loc) > 1 else ""
    message = bad_json.get(field, error["msg"]).removeprefix("Value error, ")
    return f"invalid setting {name} ({origin}){inside}: {message}"


def _per_setting(errors: list[Any]) -> Iterator[Any]:
    """The errors, with the one that lists every broken rule between settings split into one error per
    setting it names."""
    for error in errors:
        conflicts = error.get("ctx", {}).get("error")
        if not error["loc"] and isinstance(conflicts, Conflicts):
            yield from ({"loc": (name,), "type": "conflict", "msg": why} for name, why in conflicts.conflicts)
        else:
            yield error


def load(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise SettingsError listing every problem (one line each)."""
    return load_with_origins(config_file, **overrides)[0]


def load_with_origins(config_file: Path | None = None, **overrides: Any) -> tuple[Settings, dict[str, str]]:
    """:func:`load`, and where each setting came from (:func:`origins`), for ``config show``."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise SettingsError(f"cannot read config file {config_file}: {exc}") from None
        if not isinstance(values, dict):
            raise SettingsError(f"config file {config_file} must hold a JSON object")
    values.update(overrides)
    secrets_dir = _secrets_dir(values)
    where = origins(values, secrets_dir, config_file)
    problems = _unknown_names(secrets_dir)
    bad_json: dict[str, str] = {}
    token = _bad_json.set(bad_json)
    try:
        settings = Settings(**values, _secrets_dir=secrets_dir)
    except ValidationError as exc:
        seen = set()
        for error in _per_setting(exc.errors(include_url=False)):
            line = _problem(error, where, bad_json)
            field = str(error["loc"][0]) if error["loc"] else "?"
            if field in bad_json:  # one line for an undecodable value, not one per failed check
                line = _problem({"loc": (field,), "type": "json", "msg": ""}, where, bad_json)
            if line not in seen:
                seen.add(line)
                problems.append(line)
        raise SettingsError(problems) from None
    except SourceError as exc:  # anything else a source could not read
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise SettingsError([*problems, f"{exc}{cause}"]) from None
    finally:
        _bad_json.reset(token)
    problems += [_problem({"loc": (f,), "type": "json", "msg": ""}, where, bad_json) for f in bad_json]
    problems += missing_extras(settings.needed_extras())
    if problems:
        raise SettingsError(problems)
    _register_secrets(settings)
    return settings, where


def _secrets_dir(values: dict[str, Any]) -> Path | None:
    """``INCIDENTD_SECRETS_DIR`` (or the config file's ``secrets_dir``); it must be a directory."""
    env = _env_names()
    raw = os.environ[env[f"{ENV_PREFIX}SECRETS_DIR"]] if f"{ENV_PREFIX}SECRETS_DIR" in env else None
    raw = raw if raw is not None else values.get("secrets_dir")
    if not raw:
        return None
    path = Path(raw)
    if not path.is_dir():
        raise SettingsError(f"invalid setting {ENV_PREFIX}SECRETS_DIR: {path} is not a directory")
    return path


def _register_secrets(settings: Settings) -> None:
    """Every secret value is masked wherever it would appear in a log line or stored error text."""
    for url in (settings.rabbitmq_url, settings.postgres_dsn):
        password = urlsplit(url).password
        register_secret(password)
    for secret in (settings.clickhouse_password, settings.github_token, settings.slack_default_webhook_url,
                   *(route.webhook_url for route in settings.slack_routes)):  # fmt: skip
        register_secret(secret.get_secret_value())


def shown(settings: Settings) -> dict[str, Any]:
    """The effective settings as JSON-able values, secrets masked (``config show``)."""
    out: dict[str, Any] = {}
    for field, value in settings.model_dump(mode="json").items():
        raw = getattr(settings, field)
        if isinstance(raw, SecretStr):
            value = "***" if raw.get_secret_value() else ""
        elif field == "slack_routes":
            value = [{**route, "webhook_url": "***" if route["webhook_url"] else ""} for route in value]
        elif isinstance(value, str):
            value = redact(value)
        out[field] = value
    return out
