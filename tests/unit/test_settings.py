"""Settings: environment over JSON file over defaults; a bad value is one clear line naming the setting."""

from __future__ import annotations

import json

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
