"""The command line when something is wrong: one line, no traceback (unless --debug), secrets masked;
and the commands that show what the settings are (`--version`, `config show`, `config check`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workers import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "events.jsonl"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("INCIDENTD_")}
    return clean | {"INCIDENTD_SQLITE_PATH": str(tmp_path / "incidentd.db"), "INCIDENTD_OPS_ENABLED": "false"}


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_version(env: dict[str, str]) -> None:
    """`--version` prints the installed version."""
    result = run(env, "--version")
    assert result.returncode == 0 and result.stdout.startswith("incidentd ")


def test_a_misspelt_variable_stops_the_worker_naming_the_closest(env: dict[str, str]) -> None:
    """INCIDENTD_CONCURENCY=8 is not silently ignored: exit 2, one line, the closest name suggested."""
    result = run(env | {"INCIDENTD_CONCURENCY": "8"}, "worker", "--from", str(EXAMPLE))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "incidentd: unknown setting INCIDENTD_CONCURENCY in the environment; "
        "did you mean INCIDENTD_CONCURRENCY?"
    ]


def test_config_show_masks_secrets_and_says_where_each_value_came_from(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`config show` lists every setting with its source; URL passwords, tokens and webhook URLs are
    masked, whether they came from the environment, a secrets file or the config file."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "incidentd_github_token").write_text("ghp_SECRETSECRETSECRET0123456789\n")
    config = tmp_path / "incidentd.json"
    webhook = "https://hooks.slack.com/services/T1/B2/WEBHOOKSECRET"
    config.write_text(json.dumps({"slack_routes": [{"match": {"service": "api"}, "webhook_url": webhook}]}))
    env |= {
        "INCIDENTD_RABBITMQ_URL": "amqp://incidentd:MQ-PASSWORD@mq.example:5672/prod",
        "INCIDENTD_SECRETS_DIR": str(secrets),
    }
    result = run(env, "--config", str(config), "config", "show", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    for secret in ("MQ-PASSWORD", "ghp_SECRET", "WEBHOOKSECRET"):
        assert secret not in result.stdout
    assert shown["rabbitmq_url"] == {
        "value": "amqp://incidentd:***@mq.example:5672/prod",
        "source": "environment",
    }
    assert shown["github_token"] == {
        "value": "***",
        "source": f"secrets file {secrets / 'incidentd_github_token'}",
    }
    assert shown["slack_routes"]["source"] == f"config file {config}"
    assert shown["concurrency"] == {"value": 64, "source": "default"}
    table = run(env, "--config", str(config), "config", "show")
    assert "rabbitmq_url" in table.stdout and "MQ-PASSWORD" not in table.stdout


def test_config_check_reports_every_problem_or_ok(env: dict[str, str], tmp_path: Path) -> None:
    """`config check` exits 0 with "ok" for good settings, and 2 with one line per problem (including a
    secret file that cannot be read) for bad ones."""
    assert run(env, "config", "check").stdout.startswith("ok: ")
    bad = env | {"INCIDENTD_MAX_ATTEMPTS": "0", "INCIDENTD_LOG_LEVEL": "loud"}
    result = run(bad, "config", "check")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 2
    missing = env | {"INCIDENTD_GITHUB_TOKEN_FILE": str(tmp_path / "none")}
    result = run(missing, "config", "check")
    assert result.returncode == 2 and "cannot read secret file" in result.stderr


def test_an_unreachable_store_is_one_line_and_the_traceback_only_with_debug(env: dict[str, str]) -> None:
    """`incidents list` against a PostgreSQL that refuses: exit 1 with one JSON error line, password
    masked; with --debug the same line carries the traceback (frames only)."""
    dsn = f"postgresql://incidentd:PG-PASSWORD@127.0.0.1:{free_port()}/x"
    env |= {"INCIDENTD_STORE": "postgres", "INCIDENTD_POSTGRES_DSN": dsn}
    result = run(env, "incidents", "list")
    assert result.returncode == 1
    [line] = [json.loads(x) for x in result.stderr.splitlines()]
    assert line["event"] == "command.failed" and "Connect call failed" in line["error"]
    assert "exception" not in line and "Traceback" not in result.stderr
    debug = run(env, "--debug", "incidents", "list")
    assert debug.returncode == 1
    [line] = [json.loads(x) for x in debug.stderr.splitlines()]
    frames = line["exception"][0]["frames"]
    assert frames and all("locals" not in frame for frame in frames)
    assert "PG-PASSWORD" not in result.stderr + debug.stderr


def test_a_slack_webhook_file_without_a_scheme_stops_start_up_with_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A webhook URL read from a file is checked at start-up: without a scheme the worker exits 1 with one
    line naming the setting and the file, never the URL."""
    webhook = tmp_path / "slack"
    webhook.write_text("hooks.slack.com/services/T1/B2/WEBHOOKSECRET\n")
    env |= {"INCIDENTD_SLACK_ENABLED": "true", "INCIDENTD_SLACK_DEFAULT_WEBHOOK_URL_FILE": str(webhook)}
    result = run(env, "worker", "--from", str(EXAMPLE))
    assert result.returncode == 1
    errors = [json.loads(x) for x in result.stderr.splitlines() if '"error"' in x]
    [line] = [e for e in errors if e["level"] == "error"]
    assert "slack_default_webhook_url" in line["error"] and "scheme" in line["error"]
    assert "WEBHOOKSECRET" not in result.stderr


def test_pubsub_setup_against_an_unreachable_emulator_fails_fast_with_one_line(env: dict[str, str]) -> None:
    """An emulator host nothing listens on: `setup` retries for INCIDENTD_STARTUP_TIMEOUT (here 6 s), one
    line per attempt, then exits 1 with one line, instead of hanging silently for 90 s."""
    env |= {
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{free_port()}", "INCIDENTD_BROKER": "pubsub",
        "INCIDENTD_PUBSUB_PROJECT": "incidentd-test", "INCIDENTD_STARTUP_TIMEOUT": "6",
    }  # fmt: skip
    started = time.monotonic()
    result = run(env, "setup", timeout=60)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    lines = [json.loads(x) for x in result.stderr.splitlines()]
    assert [x["event"] for x in lines if x["level"] == "error"] == ["command.failed"]
    assert any(x["event"] == "startup.waiting" for x in lines)


def test_pubsub_without_credentials_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    """No emulator and no Google credentials: one error line saying so (not 63 lines of traceback). The
    metadata server is pointed at loopback so the test never leaves the machine."""
    env = {
        k: v for k, v in env.items() if k not in ("PUBSUB_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")
    }
    closed = f"127.0.0.1:{free_port()}"
    env |= {
        "INCIDENTD_BROKER": "pubsub", "INCIDENTD_PUBSUB_PROJECT": "incidentd-test", "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
    }  # fmt: skip
    result = run(env, "setup", timeout=60)
    assert result.returncode == 1
    lines = [json.loads(x) for x in result.stderr.splitlines()]
    [failed] = [x for x in lines if x["level"] == "error"]
    assert "DefaultCredentialsError" in failed["error"] and "exception" not in failed


@pytest.mark.parametrize("args", [("dlq", "list"), ("publish", "incident.create", "-")])
def test_pubsub_commands_against_an_unreachable_emulator_fail_in_seconds(
    env: dict[str, str], args: tuple[str, ...]
) -> None:
    """`dlq list` and `publish` do not wait for the client's minute of silent retries (or the publish
    timeout): one bounded call first, then one line and exit 1."""
    env |= {
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{free_port()}", "INCIDENTD_BROKER": "pubsub",
        "INCIDENTD_PUBSUB_PROJECT": "incidentd-test",
    }  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
        input='{"title": "x"}', timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert time.monotonic() - started < 25
    [line] = [json.loads(x) for x in result.stderr.splitlines()]
    assert line["event"] == "command.failed" and "ServiceUnavailable" in line["error"]
