"""incidentd's settings: environment (``INCIDENTD_*``) over files in ``INCIDENTD_SECRETS_DIR`` over a JSON
file (``--config``) over defaults.

Settings are flat (``INCIDENTD_RABBITMQ_URL``, not nested) so that every setting has one obvious
environment variable name, one key in the JSON file and one file name in the secrets directory
(``incidentd_rabbitmq_url``: a mounted Kubernetes Secret). They are validated once, at start-up; every bad
value, unknown ``INCIDENTD_*`` name and undecodable JSON value is reported at once, one line each, naming
the setting, where it came from and (for lists and maps) the place inside it (see :func:`load`).
"""

from __future__ import annotations

import contextvars
import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

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
from common.redact import redact, register_secret

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

    @field_validator("webhook_url")
    @classmethod
    def _webhook_is_a_url(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            _check_url(value.get_secret_value(), HTTP)
        return value


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
    # The worker's whole shutdown after SIGTERM, split (application/worker.py): a fifth (at most 10 s) for
    # settles under way, a fifth (at most 5 s) for the broker's close, the rest for running handlers.
    shutdown_timeout: float = Field(default=25.0, ge=0)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Identical warning / error lines (the same event and error, whatever the message) within this many
    # seconds are written once, the next one carrying "repeated": N (0: write every line).
    log_repeat_window: float = Field(default=10.0, ge=0)
    # How long `worker` and `setup` keep trying to reach the broker and the store at start-up.
    startup_timeout: float = Field(default=60.0, ge=0)
    # A directory holding settings as files named like the variables (incidentd_rabbitmq_url, ...): a
    # mounted Kubernetes Secret. Only from the environment or the config file, not from itself.
    secrets_dir: Path | None = None

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

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
    # Quorum queues: deliveries of one message (including returns when a channel or connection drops)
    # before RabbitMQ dead-letters it to <queue>.dlq itself - the backstop for a message that kills the
    # consumer before incidentd can settle it. incidentd's own attempts are counted separately.
    rabbitmq_delivery_limit: int = Field(default=20, ge=1, le=10_000)

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        _check_url(value, ("amqp", "amqps"))
        return value

    @field_validator("postgres_dsn")
    @classmethod
    def _postgres_dsn(cls, value: str) -> str:
        _check_url(value, ("postgresql", "postgres"), host=False)  # host may be in ?host= (a socket)
        return value

    @field_validator("github_api_url", "kubernetes_host", "aws_endpoint_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value:
            _check_url(value, HTTP)
        return value

    @field_validator("slack_default_webhook_url")
    @classmethod
    def _webhook_url(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            _check_url(value.get_secret_value(), HTTP)
        return value

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

    # --- AI analysis of incidents (docs/ai.md); off by default ----------------------------------------
    ai_enabled: bool = False
    ai_provider: Literal["openai", "bedrock"] = "openai"
    ai_model: str = ""  # required when enabled: e.g. "llama3.1:8b" (Ollama), a Bedrock model or profile id
    ai_base_url: str = ""  # openai: the endpoint's base URL, e.g. http://127.0.0.1:11434/v1
    ai_api_key: SecretStr = SecretStr("")  # openai: sent as a Bearer token; none for a local endpoint
    ai_api_key_file: Path | None = None
    ai_json_mode: bool = True  # openai: ask for response_format json_object (vLLM, Ollama, OpenAI accept it)
    ai_region: str = ""  # bedrock: empty for the usual AWS chain
    ai_endpoint_url: str = ""  # bedrock: tests only
    ai_min_severity: Literal["critical", "high", "medium", "low", "info"] = "high"
    ai_knowledge_dir: Path = Path("runbooks")  # markdown runbooks, indexed with BM25, re-indexed on change
    ai_top_k: int = Field(default=3, ge=0, le=20)  # runbook passages in the prompt
    ai_history: int = Field(default=5, ge=0, le=50)  # previous resolved incidents in the prompt
    ai_timeout: float = Field(default=60.0, gt=0, le=600)  # seconds per model call
    ai_token_budget: int = Field(default=12_000, ge=1_000, le=1_000_000)  # per analysis, retry included
    ai_max_output_tokens: int = Field(default=1_000, ge=100, le=100_000)
    ai_max_per_hour: int = Field(default=30, ge=0, le=100_000)  # analyses calling the model, per worker

    @field_validator("ai_model", "ai_base_url")
    @classmethod
    def _ai_endpoint(cls, value: str, info: ValidationInfo) -> str:
        if not info.data.get("ai_enabled") or value:
            return value
        if info.field_name == "ai_model":
            raise ValueError("a model is required when ai_enabled is true")
        if info.data.get("ai_provider") == "openai":
            raise ValueError("the endpoint's base URL is required when ai_provider is openai")
        return value

    @field_validator("ai_max_output_tokens")
    @classmethod
    def _ai_budget_fits(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("ai_token_budget", 0) < 3 * value:
            raise ValueError("ai_token_budget must be at least 3 x ai_max_output_tokens")
        return value

    @model_validator(mode="after")
    def _ai_command_timeout(self) -> Settings:
        """incident.analyze may take two model calls: unless its timeout is set, it gets them."""
        if self.ai_enabled:
            self.command_timeouts.setdefault("incident.analyze", 2 * self.ai_timeout + 30)
        return self

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

    # --- maintenance: retention and archival (infra/maintenance.py; docs/operations.md#retention) -------
    # Idempotency keys (processed_messages) older than this are deleted. It must stay well above the
    # longest time a broker can hand back a message already handled (redelivery, Pub/Sub seek over a
    # topic's retention of up to 31 days, a dead letter replayed later): a key pruned earlier lets that
    # copy apply twice. 0 keeps them for ever.
    processed_messages_retention_days: float = Field(default=45.0, ge=0)
    # Resolved incidents whose last event is older than this are archived to S3 (the AWS adapter's
    # bucket) and then deleted. Off by default; needs aws_enabled and aws_archive_bucket.
    incident_archive_enabled: bool = False
    incident_retention_days: float = Field(default=90.0, gt=0)
    # Rows deleted per transaction (short transactions, no long locks).
    maintenance_batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    # Seconds between the worker's maintenance runs (one pod at a time, under an advisory lock); 0: the
    # worker never runs it (run `app.py maintenance`, e.g. the CronJob in deploy/, instead).
    maintenance_interval: float = Field(default=3600.0, ge=0)

    @field_validator("incident_archive_enabled")
    @classmethod
    def _archive_needs_a_bucket(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not (info.data.get("aws_enabled") and info.data.get("aws_archive_bucket")):
            raise ValueError("archiving incidents needs aws_enabled and aws_archive_bucket")
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
        # init_settings carries the JSON file's values (see load); the secrets directory wins over them,
        # the environment over both.
        secrets_dir = getattr(file_secret_settings, "secrets_dir", None)
        return (_Env(settings_cls), _Secrets(settings_cls, secrets_dir=secrets_dir), init_settings)


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
        for error in exc.errors(include_url=False):
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
