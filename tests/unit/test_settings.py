"""Settings: environment over JSON file over defaults; a bad value is one clear line naming the setting."""

from __future__ import annotations

import json
import os

import pytest

from config.settings import SettingsError, load


def test_defaults_run_the_embedded_broker_and_store(monkeypatch):
    """With nothing configured, incidentd runs on the memory broker and SQLite."""
    for name in ("INCIDENTD_BROKER", "INCIDENTD_STORE"):
        monkeypatch.delenv(name, raising=False)
    settings = load()
    assert (settings.broker, settings.store, settings.shutdown_timeout) == ("memory", "sqlite", 25.0)


def test_environment_overrides_the_config_file(tmp_path, monkeypatch):
    """INCIDENTD_* wins over the JSON file, which wins over the defaults."""
    config = tmp_path / "incidentd.json"
    config.write_text(json.dumps({"concurrency": 7, "max_attempts": 9}))
    monkeypatch.setenv("INCIDENTD_MAX_ATTEMPTS", "2")
    settings = load(config)
    assert (settings.concurrency, settings.max_attempts) == (7, 2)


def test_lists_and_maps_come_from_json_in_the_environment(monkeypatch):
    """Structured settings are JSON in their environment variable."""
    monkeypatch.setenv("INCIDENTD_RETRY_BACKOFF", "[0.5, 2]")
    monkeypatch.setenv("INCIDENTD_COMMAND_TIMEOUTS", '{"alertmanager.webhook": 3}')
    settings = load()
    assert settings.retry_backoff == [0.5, 2.0]
    assert settings.command_timeouts == {"alertmanager.webhook": 3.0}


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("INCIDENTD_CONCURRENCY", "lots", "invalid setting INCIDENTD_CONCURRENCY"),
        ("INCIDENTD_CONCURRENCY", "0", "greater than or equal to 1"),
        ("INCIDENTD_BROKER", "kafka", "invalid setting INCIDENTD_BROKER"),
        ("INCIDENTD_RETRY_BACKOFF", "[1, -2]", "delays must be >= 0"),
    ],
)
def test_bad_value_is_reported_naming_the_setting(monkeypatch, name, value, says):
    """A bad value stops start-up with a message that names the setting and what is wrong."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=says):
        load()


def test_unknown_key_in_the_config_file_is_an_error(tmp_path):
    """A typo in the config file is reported instead of silently ignored."""
    config = tmp_path / "incidentd.json"
    config.write_text(json.dumps({"concurency": 7}))
    with pytest.raises(SettingsError, match=r"unknown setting 'concurency' .*did you mean 'concurrency'"):
        load(config)


@pytest.fixture
def clean_env(monkeypatch):
    """No INCIDENTD_* variable from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("INCIDENTD_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_a_misspelt_environment_variable_is_rejected_naming_the_closest(clean_env):
    """INCIDENTD_CONCURENCY would be ignored silently; it is an error that suggests INCIDENTD_CONCURRENCY."""
    clean_env.setenv("INCIDENTD_CONCURENCY", "8")
    with pytest.raises(SettingsError) as caught:
        load()
    assert caught.value.problems == [
        "unknown setting INCIDENTD_CONCURENCY in the environment; did you mean INCIDENTD_CONCURRENCY?"
    ]


def test_kubernetes_service_link_variables_are_not_settings(clean_env):
    """Kubernetes adds INCIDENTD_METRICS_SERVICE_HOST, ..._PORT, ..._PORT_8080_TCP... for a Service named
    incidentd-metrics: they are recognised by their _SERVICE_HOST anchor and left alone."""
    for name, value in {
        "INCIDENTD_METRICS_SERVICE_HOST": "10.0.0.1", "INCIDENTD_METRICS_SERVICE_PORT": "8080",
        "INCIDENTD_METRICS_SERVICE_PORT_OPS": "8080", "INCIDENTD_METRICS_PORT": "tcp://10.0.0.1:8080",
        "INCIDENTD_METRICS_PORT_8080_TCP": "tcp://10.0.0.1:8080",
        "INCIDENTD_METRICS_PORT_8080_TCP_ADDR": "10.0.0.1",
    }.items():  # fmt: skip
        clean_env.setenv(name, value)
    assert load().concurrency == 64
    clean_env.setenv("INCIDENTD_OPS_PROT", "9")  # a typo ending like a link variable is still caught
    with pytest.raises(SettingsError, match=r"INCIDENTD_OPS_PROT .*did you mean INCIDENTD_OPS_PORT"):
        load()


def test_bad_json_in_the_environment_is_one_line_not_a_traceback(clean_env):
    """A list setting that is not JSON names the variable and the JSON error."""
    clean_env.setenv("INCIDENTD_RETRY_BACKOFF", "[1, 5,")
    with pytest.raises(SettingsError) as caught:
        load()
    [line] = caught.value.problems
    assert line.startswith("invalid setting INCIDENTD_RETRY_BACKOFF (environment): not valid JSON (")


def test_every_problem_is_reported_at_once_with_nested_locations(clean_env, tmp_path):
    """Unknown names, bad JSON, bad values and bad entries inside lists come out together, one line each,
    with where each came from and the path inside a structured value."""
    clean_env.setenv("INCIDENTD_CONCURENCY", "8")
    clean_env.setenv("INCIDENTD_COMMAND_TIMEOUTS", "{oops")
    clean_env.setenv("INCIDENTD_MAX_ATTEMPTS", "0")
    clean_env.setenv(
        "INCIDENTD_SLACK_ROUTES", json.dumps([{"match": {"team": "a"}, "webhook_url_file": "/x"}])
    )
    config = tmp_path / "incidentd.json"
    config.write_text(json.dumps({"retry_backoff": [1, -1], "shutdown_timeout": "soon"}))
    with pytest.raises(SettingsError) as caught:
        load(config)
    problems = caught.value.problems
    assert len(problems) == 6, problems
    assert problems[0].startswith("unknown setting INCIDENTD_CONCURENCY")
    assert any(
        p.startswith("invalid setting INCIDENTD_COMMAND_TIMEOUTS (environment): not valid JSON")
        for p in problems
    )
    assert any(p.startswith("invalid setting INCIDENTD_MAX_ATTEMPTS (environment): ") for p in problems)
    assert any(
        p.startswith("invalid setting INCIDENTD_SLACK_ROUTES (environment) at slack_routes.0.match.team")
        for p in problems
    )
    assert f"invalid setting INCIDENTD_RETRY_BACKOFF (config file {config}): delays must be >= 0" in problems
    assert any(
        p.startswith(f"invalid setting INCIDENTD_SHUTDOWN_TIMEOUT (config file {config}): ") for p in problems
    )


def test_log_level_and_format_are_case_insensitive(clean_env):
    """INCIDENTD_LOG_LEVEL=WARNING works like warning."""
    clean_env.setenv("INCIDENTD_LOG_LEVEL", "WARNING")
    clean_env.setenv("INCIDENTD_LOG_FORMAT", "Console")
    settings = load()
    assert (settings.log_level, settings.log_format) == ("warning", "console")


def test_every_setting_can_come_from_a_file_in_the_secrets_dir(clean_env, tmp_path):
    """A mounted Secret: files named like the variables (any case) give the RabbitMQ URL, the PostgreSQL
    DSN, the ClickHouse password, the GitHub token and Slack webhooks; the environment still wins; a
    misspelt file name is reported like a misspelt variable."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    files = {
        "incidentd_rabbitmq_url": "amqp://incidentd:mq-pass@mq:5672/prod\n",
        "INCIDENTD_POSTGRES_DSN": "postgresql://incidentd:pg-pass@db/incidentd",
        "incidentd_clickhouse_password": "ch-pass",
        "incidentd_github_token": "ghp_0123456789abcdefghij0123456789",
        "incidentd_slack_default_webhook_url": "https://hooks.slack.com/services/T1/B2/abc",
        "incidentd_concurrency": "7",
    }
    for name, content in files.items():
        (secrets / name).write_text(content)
    clean_env.setenv("INCIDENTD_SECRETS_DIR", str(secrets))
    clean_env.setenv("INCIDENTD_CONCURRENCY", "9")
    settings = load()
    assert settings.rabbitmq_url == "amqp://incidentd:mq-pass@mq:5672/prod"
    assert settings.postgres_dsn == "postgresql://incidentd:pg-pass@db/incidentd"
    assert settings.clickhouse_password.get_secret_value() == "ch-pass"
    assert settings.github_token.get_secret_value().startswith("ghp_")
    assert settings.slack_default_webhook_url.get_secret_value().endswith("/T1/B2/abc")
    assert settings.concurrency == 9
    (secrets / "incidentd_github_tokn").write_text("x")
    with pytest.raises(SettingsError, match=r"unknown setting file .*incidentd_github_tokn; did you mean"):
        load()


def test_a_secrets_dir_that_does_not_exist_is_an_error(clean_env, tmp_path):
    """A mistyped mount path fails start-up instead of silently using the defaults."""
    clean_env.setenv("INCIDENTD_SECRETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SettingsError, match=r"INCIDENTD_SECRETS_DIR: .* is not a directory"):
        load()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (
            "INCIDENTD_SLACK_DEFAULT_WEBHOOK_URL",
            "hooks.slack.com/services/T1/B2/secret",
            "scheme must be https",
        ),
        ("INCIDENTD_RABBITMQ_URL", "guest:guest@localhost:5672", "scheme must be amqp or amqps"),
        ("INCIDENTD_POSTGRES_DSN", "127.0.0.1:5432/test", "scheme must be postgresql or postgres"),
        ("INCIDENTD_GITHUB_API_URL", "https://", "URL has no host"),
    ],
)
def test_urls_are_validated_at_start_up_without_echoing_them(clean_env, name, value, says):
    """A URL without a scheme (or host) stops start-up naming the setting, and the message does not
    repeat the URL, which carries a password or a webhook token."""
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError, match=says) as caught:
        load()
    assert "secret" not in str(caught.value) and "guest" not in str(caught.value)
