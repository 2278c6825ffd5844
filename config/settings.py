"""incidentd's settings: environment (``INCIDENTD_*``) over a JSON file (``--config``) over defaults.

Settings are flat (``INCIDENTD_RABBITMQ_URL``, not nested) so that every setting has one obvious
environment variable name and one key in the JSON file. They are validated once, at start-up; a bad value
stops the process with one line naming the setting (see :func:`load`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "INCIDENTD_"


class SettingsError(Exception):
    """A setting has a bad value; the message names it and says what is expected."""


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

    # --- rabbitmq (infra/rabbitmq; docs/rabbitmq.md) ------------------------------------------------
    # Prefetch is derived, not set: 2 x concurrency (capped at 65535), so a slot that frees up finds
    # the next delivery already in the process while the broker sends more.
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    rabbitmq_exchange: str = "incidentd"
    rabbitmq_queue: str = "incidentd"
    rabbitmq_queue_type: Literal["quorum", "classic"] = "quorum"

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
