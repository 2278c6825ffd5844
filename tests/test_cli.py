"""The command line as a user runs it: subprocesses, real files, the embedded broker and store."""

from __future__ import annotations

import json
import os
import re
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
    from application.errors import DecodeError
    from application.factory import CommandFactory
    from application.handlers import HANDLERS
    from application.messages import Message
    from infra.memory.feed import parse

    factory = CommandFactory(HANDLERS)
    bad = []
    for line in EXAMPLE.read_bytes().splitlines():
        fed = parse(line)
        if fed is None:
            continue
        try:
            factory.decode(Message(fed.body, fed.attributes))
        except DecodeError:
            bad.append(fed.body.decode())
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


HEAVY = ("application", "infra", "config.bootstrap", "config.container", "config.settings", "aiohttp",
         "pydantic", "pydantic_settings", "structlog", "dependency_injector")  # fmt: skip


@pytest.mark.parametrize("args", [["--help"], ["worker", "--help"], ["--version"], ["dlq", "--bogus"]])
def test_help_version_and_usage_errors_answer_without_loading_the_application(env, args):
    """`--help`, `--version` and a mistyped option are answered by click alone: the application, the
    adapters, the settings model and the HTTP server are imported only by a command that runs (loading
    them all is what made `--help` take most of a second)."""
    probe = (
        "import json, sys; sys.argv = ['app.py', *json.loads(sys.argv[1])]; import app\n"
        "try:\n    app.main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('\\nloaded: ' + json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(args)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    loaded = json.loads(result.stderr.rsplit("loaded: ", 1)[1])
    assert "click" in loaded and "app" in loaded
    assert [m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY)] == []
    assert ("Usage:" in result.stdout or "incidentd " in result.stdout) or "No such option" in result.stderr


# --- worker --from: the main job on the embedded default ---------------------------------------------


def write_lines(path: Path, lines: list[object]) -> Path:
    """One line per item: str and bytes as they are, anything else as JSON."""
    with path.open("wb") as f:
        for line in lines:
            raw = line if isinstance(line, bytes) else line.encode() if isinstance(line, str) else None
            f.write((raw if raw is not None else json.dumps(line).encode()) + b"\n")
    return path


def create(title: str, **fields: object) -> dict[str, object]:
    return {"type": "incident.create", "data": {"title": title, "service": "payments",
            "environment": "production", "dedup_key": "payments-provider", **fields}}  # fmt: skip


def test_worker_from_uses_the_embedded_broker_whatever_incidentd_broker_says(env, tmp_path):
    """With INCIDENTD_BROKER=rabbitmq (as in every pod) `--from` still feeds the embedded broker: it
    neither publishes into the real queue nor needs it (the URL here points at a closed port)."""
    feed = write_lines(tmp_path / "f.jsonl", [create("one")])
    pod = env | {"INCIDENTD_BROKER": "rabbitmq", "INCIDENTD_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:9/"}
    result = run(pod, "worker", "--from", str(feed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("messages: 1 acked, 0 dead-lettered, 0 retried")
    assert any(json.loads(x)["event"] == "feed.broker_pinned" for x in result.stderr.splitlines())


def test_a_deeply_nested_line_is_one_dead_letter_and_the_lines_after_it_are_processed(env, tmp_path):
    """A 10,000-deep line (RecursionError in the old reader) is dead-lettered; the next line is handled."""
    deep = b'{"type": "incident.create", "data": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    feed = write_lines(tmp_path / "f.jsonl", [deep, b"[" * 50_000, create("after the deep ones")])
    result = run(env, "worker", "--from", str(feed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("messages: 1 acked, 2 dead-lettered, 0 retried")
    letters = json.loads(run(env, "dlq", "list", "--json").stdout)
    assert len(letters) == 2 and all(letter["reason"] for letter in letters)


def test_feeding_the_same_file_twice_does_not_double_occurrences(env, tmp_path, payload):
    """Each line's message id is stable (a digest of the line), so a second feed changes nothing."""
    feed = write_lines(tmp_path / "f.jsonl", [payload("alertmanager_firing"), create("manual")])
    for _ in range(2):
        assert run(env, "worker", "--from", str(feed)).returncode == 0
    incidents = json.loads(run(env, "incidents", "list", "--json").stdout)
    assert len(incidents) == 3
    assert all(i["occurrences"] == 1 for i in incidents)


def test_stdin_is_fed_with_a_dash(env, payload):
    """`worker --from -` reads the lines from standard input."""
    result = run(env, "worker", "--from", "-", input=json.dumps(create("from stdin")) + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("messages: 1 acked, 0 dead-lettered, 0 retried")


def test_strict_exits_non_zero_when_anything_was_dead_lettered(env, tmp_path):
    """`--strict` turns a dead letter into exit status 1; without it the run exits 0."""
    feed = write_lines(tmp_path / "f.jsonl", [create("fine"), "not json"])
    assert run(env, "worker", "--from", str(feed)).returncode == 0
    strict = run(env, "worker", "--from", str(feed), "--strict")
    assert strict.returncode == 1
    assert "1 dead-lettered" in strict.stdout.splitlines()[0]


def test_outcomes_are_counted_per_message_not_per_attempt(env, tmp_path):
    """A message redelivered three times before it is dead-lettered counts once as dead-lettered and
    once as retried (the old summary counted every attempt)."""
    ack = {"type": "incident.acknowledge", "data": {"dedup_key": "never-created", "actor": "a"}}
    feed = write_lines(tmp_path / "f.jsonl", [ack, create("fine")])
    fast = env | {"INCIDENTD_RETRY_BACKOFF": "[0.05]", "INCIDENTD_MAX_ATTEMPTS": "4",
                  "INCIDENTD_IN_PROCESS_ATTEMPTS": "1"}  # fmt: skip
    result = run(fast, "worker", "--from", str(feed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("messages: 1 acked, 1 dead-lettered, 1 retried")


def test_envelopes_are_lossless_and_a_bad_envelope_is_one_dead_letter_with_the_rule(env, tmp_path):
    """`data_base64` carries exact bytes (empty, non-JSON, duplicate keys) with attributes; attribute
    values must be strings (never `true` -> "True"); a bad attempt attribute is a dead letter, not a crash."""
    import base64

    exact = base64.b64encode(b'{"title": "a", "title": "b"}').decode()
    feed = write_lines(tmp_path / "f.jsonl", [
        {"type": "incident.create", "data_base64": exact, "attributes": {"k": "v"}},
        {"type": "incident.create", "data_base64": ""},
        {"type": "incident.create", "data_base64": base64.b64encode(b"\xff not json").decode()},
        {"type": "incident.create", "data": {"title": "x"}, "attributes": {"flag": True}},
        {"type": "incident.create", "data": {"title": "x"}, "attributes": {"x-incidentd-attempt": "abc"}},
        {"type": "incident.create", "data": {"title": "x"}, "attributes": {"x-incidentd-attempt": "1e309"}},
        {"type": "incident.create", "data": {"title": "x"}, "attributes": {"x-incidentd-first-seen": "soon"}},
    ])  # fmt: skip
    result = run(env, "worker", "--from", str(feed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("messages: 1 acked, 6 dead-lettered, 0 retried")
    letters = json.loads(run(env, "dlq", "list", "--json").stdout)
    by_body = {letter["body"]: letter for letter in letters}
    assert "" in by_body and "not valid JSON" in by_body[""]["reason"]
    assert any(letter["body_encoding"] == "base64" for letter in letters)
    reasons = " | ".join(letter["reason"] for letter in letters)
    assert "attribute 'flag' must be a string, not bool" in reasons
    assert reasons.count("x-incidentd-attempt") == 2 and "x-incidentd-first-seen" in reasons
    [incident] = json.loads(run(env, "incidents", "list", "--json").stdout)
    assert incident["title"] == "b"  # the exact bytes reached the factory: the last duplicate key wins


def test_ctrl_c_stops_cleanly_with_130_and_says_what_was_not_processed(env):
    """SIGINT while feeding from a pipe exits 130 with "N processed, M not processed"; meanwhile a
    progress log line appears every few seconds (stderr is not a terminal)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "worker", "--from", "-"],
        env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        proc.stdin.write(json.dumps(create("before ctrl-c")) + "\n")
        proc.stdin.flush()
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("feed.progress" in x for x in seen):
            seen.append(proc.stderr.readline())
        assert any("message.acked" in x for x in seen) and any("feed.progress" in x for x in seen)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "interrupted: 1 processed, 0 not processed" in out
    finally:
        proc.kill()


def test_summary_and_incidents_list_say_when_they_show_only_the_newest(env, tmp_path):
    """Neither the summary nor `incidents list` stops silently at the limit: "3 of 7"."""
    feed = write_lines(tmp_path / "f.jsonl", [create(f"t{n}", dedup_key=f"k{n}") for n in range(7)])
    result = run(env, "worker", "--from", str(feed), "--limit", "3")
    assert "showing the newest 3 of 7 incidents" in result.stdout
    listed = run(env, "incidents", "list", "--limit", "3")
    assert "showing the newest 3 of 7 incidents" in listed.stdout
    assert sum(1 for line in listed.stdout.splitlines() if re.search(r"  t\d$", line)) == 3


def test_titles_cannot_forge_rows_or_send_escape_sequences_to_the_terminal(env, tmp_path):
    """Control characters from an event (OSC 8 hyperlinks, ANSI, newlines forging rows, bidi overrides)
    are printed escaped by `incidents list`, `incidents show` and the summary."""
    evil = "\x1b]8;;http://evil\x07click\x1b]8;;\x07\x1b[31mred\nFORGED  resolved  critical\u202e"
    feed = write_lines(tmp_path / "f.jsonl", [create(evil)])
    summary = run(env, "worker", "--from", str(feed)).stdout
    listed = run(env, "incidents", "list").stdout
    [incident] = json.loads(run(env, "incidents", "list", "--json").stdout)
    shown = run(env, "incidents", "show", incident["id"]).stdout
    for out in (summary, listed, shown):
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert "\\x1b]8;;http://evil\\x07click" in out
        assert not any(line.startswith("FORGED") for line in out.splitlines())


def test_no_poison_harms_the_valid_events_after_it(env, tmp_path, payload):
    """Each known poison (a naive time, huge nesting, wrong types, out-of-range times) for a dedup key
    and a service/environment scope is one dead letter; the valid events fed after them for the same
    keys and scopes all succeed (a stored naive time used to dead-letter every one of them)."""
    firing = payload("alertmanager_firing")
    naive_alert = json.loads(json.dumps(firing))
    naive_alert["alerts"][0]["startsAt"] = "2026-11-23T10:00:00"
    oec = payload("oec_acknowledge")
    oec_ms, oec_overflow = json.loads(json.dumps(oec)), json.loads(json.dumps(oec))
    oec_ms["alert"]["updatedAt"] = 1763892300000  # milliseconds: read by magnitude, not as 1970
    oec_overflow["alert"]["updatedAt"] = 2.5e20
    oec_overflow["alert"]["createdAt"] = -62135596800001
    aws = payload("aws_health") | {"source": ["aws.health"]}
    poisons = [
        create("naive", at="2026-11-23T10:00:00"),
        create("year one", at="0001-01-01T00:00:00+14:00"),
        create("year 9999", at="9999-12-31T23:59:59-12:00"),
        {"type": "incident.create", "data": {"title": ["wrong type"], "dedup_key": "payments-provider"}},
        b'{"type": "incident.create", "data": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        naive_alert, oec_overflow, aws,
        {"type": "incident.acknowledge", "data": {"dedup_key": "payments-provider", "at": "2026-11-23"}},
    ]  # fmt: skip
    first = run(env, "worker", "--from", str(write_lines(tmp_path / "poison.jsonl", poisons)))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith(f"messages: 0 acked, {len(poisons)} dead-lettered, 0 retried")

    valid = [
        create("Payments provider degraded", at="2026-11-23T10:00:00+01:00"),
        create("Payments ledger lagging", dedup_key="payments-ledger"),
        firing, payload("aws_health"), payload("oec_create"), oec_ms,
        {"type": "incident.acknowledge", "data": {"dedup_key": "payments-provider", "actor": "bob"}},
    ]  # fmt: skip
    second = run(env, "worker", "--from", str(write_lines(tmp_path / "valid.jsonl", valid)))
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.startswith(f"messages: {len(valid)} acked, 0 dead-lettered")
    incidents = {i["dedup_key"]: i for i in json.loads(run(env, "incidents", "list", "--json").stdout)}
    assert incidents["payments-provider"]["status"] == "acknowledged"
    assert incidents["payments-provider"]["created_at"] == "2026-11-23T09:00:00Z"
    assert incidents["opsgenie:orders-db-replication-lag"]["status"] == "acknowledged"
    assert incidents["opsgenie:orders-db-replication-lag"]["acknowledged_at"].startswith(
        "2025-11-23T10:05:00"
    )
    assert sum(1 for i in incidents.values() if i["source"] == "alertmanager") == 2


def test_fuzzed_lines_through_worker_from_are_each_one_outcome_and_never_crash(env, tmp_path):
    """≈600 adversarial messages from a fixed seed (as exact-bytes envelopes with their attributes):
    the worker exits 0, every message is acked or dead-lettered exactly once, every dead letter has a
    reason, and nothing is retried (no validated value overflows later)."""
    import base64

    from tests import fuzz

    lines: list[object] = [
        {"data_base64": base64.b64encode(body).decode(), "attributes": attributes}
        for body, attributes in fuzz.messages(600)
        if all(isinstance(v, str) for v in attributes.values())
    ]
    lines.append(b"\xff\xfe not even UTF-8")
    result = run(env, "worker", "--from", str(write_lines(tmp_path / "fuzz.jsonl", lines)), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    acked, dead, retried = (
        int(n.replace(",", ""))
        for n in re.findall(r"([\d,]+) (?:acked|dead-lettered|retried)", result.stdout.splitlines()[0])
    )
    assert acked + dead == len(lines) and retried == 0, result.stdout.splitlines()[0]
    letters = json.loads(run(env, "dlq", "list", "--json").stdout)
    # dlq list shows one entry per message id, with the number of copies (identical lines share an id)
    assert sum(letter["copies"] for letter in letters) == dead
    assert all(letter["reason"].strip() for letter in letters)
    outcomes = [json.loads(x) for x in result.stderr.splitlines()]
    settled = [e["message_id"] for e in outcomes if e["event"] in ("message.acked", "message.dead_lettered")]
    assert len(settled) == len(lines)  # identical lines are one message id, each delivery one outcome
    assert len(set(settled)) == len({json.dumps(x) if isinstance(x, dict) else x for x in lines})
