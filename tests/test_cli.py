"""The command line as a user runs it: subprocesses, real files, the embedded broker and store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "events.jsonl"


@pytest.fixture
def env(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INCIDENTD_")}
    return clean | {"INCIDENTD_SQLITE_PATH": str(tmp_path / "incidentd.db")}


def run(env, *args, input=None, timeout=60):
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
    )


def garbage_lines() -> list[str]:
    """The example file's lines that can never become a command."""
    from app import _read_jsonl
    from application.errors import DecodeError
    from application.factory import CommandFactory
    from application.handlers import HANDLERS
    from application.messages import Message

    factory = CommandFactory(HANDLERS)
    bad = []
    for body, attributes in _read_jsonl(EXAMPLE.read_bytes().splitlines()):
        try:
            factory.decode(Message(body, attributes))
        except DecodeError:
            bad.append(body.decode())
    return bad


def test_worker_from_example_file_makes_incidents_and_dead_letters_garbage(env):
    """`worker --from examples/events.jsonl` exits 0, prints a summary, makes incidents from the valid
    payloads and puts every garbage line in the dead-letter store with a readable reason."""
    result = run(env, "worker", "--from", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "dead-lettered" in result.stdout and "incidents:" in result.stdout

    incidents = json.loads(run(env, "incidents", "list", "--json").stdout)
    sources = {i["source"] for i in incidents}
    assert sources == {"alertmanager", "opsgenie", "aws.health", "aws.securityhub", "manual"}
    titles = {i["title"] for i in incidents}
    assert "Payments provider degraded" in titles

    letters = json.loads(run(env, "dlq", "list", "--json").stdout)
    expected = garbage_lines()
    assert len(expected) >= 5
    assert sorted(letter["body"] for letter in letters) == sorted(expected)
    assert all(letter["reason"].startswith("undecodable message: ") for letter in letters)
    assert any("not valid JSON" in letter["reason"] for letter in letters)
    assert any("unknown command type 'incident.reboot'" in letter["reason"] for letter in letters)


def test_stderr_is_json_lines_with_one_outcome_line_per_message(env):
    """Logs are JSON objects, one per line; every message has exactly one outcome line."""
    result = run(env, "worker", "--from", str(EXAMPLE))
    events = [json.loads(line) for line in result.stderr.splitlines()]
    outcomes = [
        e for e in events if e["event"] in ("message.acked", "message.dead_lettered", "message.retry")
    ]
    published = sum(1 for line in EXAMPLE.read_text().splitlines() if line.strip())
    assert len({e["message_id"] for e in outcomes if e["event"] != "message.retry"}) == published
    assert all("duration_ms" in e and "attempt" in e for e in outcomes)


def test_incidents_persist_across_runs(env, tmp_path, payload):
    """A second run resolves the incident the first run opened: the embedded store keeps state on disk."""
    firing, resolved = tmp_path / "firing.jsonl", tmp_path / "resolved.jsonl"
    firing.write_text(json.dumps(payload("alertmanager_firing")) + "\n")
    resolved.write_text(json.dumps(payload("alertmanager_resolved")) + "\n")
    assert run(env, "worker", "--from", str(firing)).returncode == 0
    assert len(json.loads(run(env, "incidents", "list", "--json", "--status", "open").stdout)) == 2
    assert run(env, "worker", "--from", str(resolved)).returncode == 0
    [done] = json.loads(run(env, "incidents", "list", "--json", "--status", "resolved").stdout)
    assert done["source_alert"]["fingerprint"] == "c1f0a2b3d4e5f607"
    assert [t["kind"] for t in done["timeline"]] == ["opened", "resolved"]


def test_bad_setting_stops_with_one_line_naming_it(env):
    """A bad value exits 2 with one line on stderr naming the setting."""
    result = run(env | {"INCIDENTD_CONCURRENCY": "many"}, "worker", "--from", str(EXAMPLE))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "incidentd: invalid setting INCIDENTD_CONCURRENCY (environment): "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_sigterm_stops_an_idle_worker_cleanly(env):
    """SIGTERM makes the worker drain and exit 0, logging its drain time."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        line = ""
        while "worker.started" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert "worker.started" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "worker.stopped" in proc.stderr.read()
    finally:
        proc.kill()


def test_publish_on_the_embedded_broker_explains_what_to_do(env):
    """`publish` with the in-process broker refuses with an explanation instead of losing the message."""
    result = run(env, "publish", "incident.create", "-", input='{"title": "x"}')
    assert result.returncode == 2
    assert "worker --from" in result.stderr


def test_every_command_has_help(env):
    """`--help` works on every command and group."""
    for args in (
        [],
        ["worker"],
        ["publish"],
        ["incidents"],
        ["incidents", "list"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["dlq", "purge"],
        ["dlq", "show"],
        ["setup"],
    ):
        result = run(env, *args, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout, args
