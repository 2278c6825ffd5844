"""Each adapter reads its settings as one typed, read-only view; the rules between settings are checked
together, once every value is valid; a feature whose pip extra is missing stops start-up in one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import config.settings
from config.settings import Settings, SettingsError, load
from config.views import VIEWS, setting_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No INCIDENTD_* variable from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("INCIDENTD_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("attribute", list(VIEWS))
def test_every_view_field_is_a_setting_of_the_same_type(attribute: str) -> None:
    """A view cannot drift from the flat settings: each field reads a setting of the same type, and
    every setting with the view's prefix is in the view."""
    view, prefix = VIEWS[attribute]
    hints = typing.get_type_hints(view, localns=vars(config.settings))
    read = set()
    for field in dataclasses.fields(view):
        name = setting_name(field, prefix)
        assert name in Settings.model_fields, f"{view.__name__}.{field.name}: no setting {name}"
        assert hints[field.name] == Settings.model_fields[name].annotation, f"{view.__name__}.{field.name}"
        read.add(name)
    assert {name for name in Settings.model_fields if name.startswith(prefix)} <= read
    assert isinstance(getattr(load(), attribute), view)


def test_views_carry_the_values_and_are_read_only(clean_env: pytest.MonkeyPatch) -> None:
    """settings.clickhouse.batch_size is INCIDENTD_CLICKHOUSE_BATCH_SIZE; a view cannot be changed."""
    clean_env.setenv("INCIDENTD_CLICKHOUSE_BATCH_SIZE", "250")
    clean_env.setenv("INCIDENTD_MAINTENANCE_INTERVAL", "0")
    clean_env.setenv("INCIDENTD_DRY_RUN", "true")
    settings = load()
    assert settings.clickhouse.batch_size == 250 == settings.clickhouse_batch_size
    assert settings.maintenance.interval == 0 and settings.maintenance.processed_messages_retention_days == 45
    assert settings.kubernetes.dry_run and settings.aws.dry_run
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.clickhouse.batch_size = 1  # type: ignore[misc]


def test_the_pubsub_view_resolves_the_dead_letter_names(clean_env: pytest.MonkeyPatch) -> None:
    """Empty dead-letter names mean "<topic>.dlq" and "<subscription>.dlq"; the view says which."""
    settings = load(broker="pubsub", pubsub_project="p", pubsub_topic="t", pubsub_subscription="s")
    assert (settings.pubsub.dead_letter_topic, settings.pubsub.dead_letter_subscription) == ("t.dlq", "s.dlq")
    named = load(broker="pubsub", pubsub_project="p", pubsub_dead_letter_topic="graveyard")
    assert named.pubsub.dead_letter_topic == "graveyard"


def test_every_broken_rule_between_settings_is_one_line_naming_its_setting(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Rules between settings are judged on the whole, valid model (declaration order no longer matters),
    and every broken rule is reported at once, naming its setting and where its value came from."""
    clean_env.setenv("INCIDENTD_BROKER", "pubsub")
    clean_env.setenv("INCIDENTD_GITHUB_ENABLED", "true")
    with pytest.raises(SettingsError) as caught:
        load(clickhouse_batch_size=500, clickhouse_buffer_limit=100, ai_enabled=True, http_auth="none",
             http_tokens_file="/tmp/tokens", incident_archive_enabled=True,
             action_rules=[{"labels": {"a": "b"}, "action": "ec2_reboot"}])  # fmt: skip
    assert caught.value.problems == [
        "invalid setting INCIDENTD_PUBSUB_PROJECT (default): a project is required when broker is pubsub",
        "invalid setting INCIDENTD_ACTION_RULES (override): rule 'rule-1' (ec2_reboot) needs aws_enabled "
        "(or dry_run)",
        "invalid setting INCIDENTD_CLICKHOUSE_BUFFER_LIMIT (override): must be at least "
        "clickhouse_batch_size",
        "invalid setting INCIDENTD_GITHUB_REPOSITORY (default): owner/name is required when github_enabled "
        "is true",
        "invalid setting INCIDENTD_GITHUB_TOKEN_FILE (default): github_token or github_token_file is "
        "required when github_enabled is true",
        "invalid setting INCIDENTD_AI_MODEL (default): a model is required when ai_enabled is true",
        "invalid setting INCIDENTD_AI_BASE_URL (default): the endpoint's base URL is required when "
        "ai_provider is openai",
        "invalid setting INCIDENTD_HTTP_AUTH (override): 'none' contradicts http_tokens_file; "
        "set one of them",
        "invalid setting INCIDENTD_INCIDENT_ARCHIVE_ENABLED (override): archiving incidents needs "
        "aws_enabled and aws_archive_bucket",
    ]


def test_analysis_gets_two_model_calls_unless_its_timeout_is_set(clean_env: pytest.MonkeyPatch) -> None:
    """With AI on, incident.analyze's timeout derives from ai_timeout; a configured one wins."""
    ai = {"ai_enabled": True, "ai_model": "m", "ai_base_url": "http://127.0.0.1:1/v1", "ai_timeout": 20}
    assert load(**ai).command_timeouts["incident.analyze"] == 70
    assert load(**ai, command_timeouts={"incident.analyze": 5}).command_timeouts["incident.analyze"] == 5


@pytest.mark.parametrize(
    ("settings", "module", "line"),
    [
        ({"broker": "pubsub", "pubsub_project": "p"}, "google.cloud.pubsub_v1",
         "INCIDENTD_BROKER=pubsub needs the pubsub extra: pip install 'incidentd[pubsub]'"),
        ({"broker": "rabbitmq"}, "aio_pika",
         "INCIDENTD_BROKER=rabbitmq needs the rabbitmq extra: pip install 'incidentd[rabbitmq]'"),
        ({"store": "postgres"}, "asyncpg",
         "INCIDENTD_STORE=postgres needs the postgres extra: pip install 'incidentd[postgres]'"),
        ({"clickhouse_enabled": True}, "asynch",
         "INCIDENTD_CLICKHOUSE_ENABLED=true needs the clickhouse extra: pip install 'incidentd[clickhouse]'"),
        ({"ai_enabled": True, "ai_provider": "bedrock", "ai_model": "m"}, "aioboto3",
         "INCIDENTD_AI_PROVIDER=bedrock needs the aws extra: pip install 'incidentd[aws]'"),
    ],
)  # fmt: skip
def test_a_missing_extra_is_one_line_naming_it(
    clean_env: pytest.MonkeyPatch, settings: dict[str, object], module: str, line: str
) -> None:
    """Enabling a feature whose client library is not installed stops loading with one line that says
    which extra to install (a None in sys.modules is how Python marks a module as not importable)."""
    load(**settings)  # installed here: fine
    clean_env.setitem(sys.modules, module, None)
    with pytest.raises(SettingsError) as caught:
        load(**settings)
    assert caught.value.problems == [line]


def test_the_embedded_default_needs_no_extra(clean_env: pytest.MonkeyPatch) -> None:
    """Memory broker and SQLite: nothing optional is needed, whatever is installed."""
    assert load().needed_extras() == []


def test_the_cli_stops_at_start_up_naming_the_missing_extra(tmp_path: Path) -> None:
    """`worker` with INCIDENTD_BROKER=rabbitmq but no aio-pika: exit 2, one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("INCIDENTD_")}
    env |= {"INCIDENTD_BROKER": "rabbitmq", "INCIDENTD_SQLITE_PATH": str(tmp_path / "db")}
    hide = "import runpy, sys; sys.modules['aio_pika'] = None; sys.argv = ['app.py', 'worker']; "
    result = subprocess.run(
        [sys.executable, "-c", hide + "runpy.run_path('app.py', run_name='__main__')"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stderr.splitlines()) == (
        2,
        ["incidentd: INCIDENTD_BROKER=rabbitmq needs the rabbitmq extra: pip install 'incidentd[rabbitmq]'"],
    )
