"""What reaches stderr: one JSON object per line whoever logs (incidentd or a client library), tracebacks
without local variables, secrets masked, and a flood of identical warnings reduced to a line per window."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from application.messages import Outcome
from common.logging import IsoClock, RepeatLimiter, configure_logging
from common.redact import redact, register_secret


class Stderr:
    """A text stream with a binary buffer, like sys.stderr, whose lines can be read back."""

    def __init__(self) -> None:
        self.raw = io.BytesIO()
        self.stream = io.TextIOWrapper(self.raw, write_through=True)

    def lines(self) -> list[dict[str, Any]]:
        self.stream.flush()
        text = self.raw.getvalue().decode()
        return [json.loads(line) for line in text.splitlines()]  # fails on any line that is not JSON

    def text(self) -> str:
        return self.raw.getvalue().decode()


@pytest.fixture
def stderr() -> Iterator[Stderr]:
    out = Stderr()
    hook = threading.excepthook
    before = structlog.get_config()
    saved = list(before["processors"])
    configure_logging("json", "info", stream=out.stream, repeat_window=10)
    yield out
    # Restored in place: loggers other tests' modules cached hold this list (see configure_logging).
    processors = structlog.get_config()["processors"]
    processors[:] = saved
    structlog.configure(**(before | {"processors": processors}))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_Handler":
            root.removeHandler(handler)
    logging.captureWarnings(False)
    threading.excepthook = hook


def test_library_lines_and_their_tracebacks_are_json_lines(stderr: Stderr) -> None:
    """aio-pika / asyncpg / asyncio log through the standard library; their multi-line messages and
    tracebacks come out as one JSON object per line, with the logger's name."""
    try:
        raise ConnectionError("connection lost\nwhile reading")
    except ConnectionError:
        logging.getLogger("aiormq.connection").exception("Unexpected\nconnection close")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    first, second = stderr.lines()
    assert first["logger"] == "aiormq.connection" and first["level"] == "error"
    assert first["event"] == "Unexpected\nconnection close"
    assert first["exception"][0]["exc_type"] == "ConnectionError"
    assert second["logger"] == "asyncio"


def test_tracebacks_carry_no_local_variables(stderr: Stderr) -> None:
    """A handler's frame holds payloads and headers; the logged traceback names frames, never locals."""

    def handler() -> None:
        headers = {"Authorization": "Bearer very-secret-value"}  # noqa: F841 - what must not leak
        raise RuntimeError("handler failed")

    try:
        handler()
    except RuntimeError:
        structlog.get_logger().exception("handler.unexpected_error")
    [line] = stderr.lines()
    frames = line["exception"][0]["frames"]
    assert frames and all("locals" not in frame for frame in frames)
    assert "very-secret-value" not in stderr.text()


def test_secrets_are_masked_in_every_logged_text(stderr: Stderr) -> None:
    """URL passwords, Slack webhook paths (with or without a scheme), tokens and registered secret values
    are masked in fields, messages of library loggers and exception texts alike."""
    register_secret("registered-secret-1234")
    log = structlog.get_logger()
    log.warning("send.failed", url="amqp://incidentd:pa55word@mq:5672/", note="registered-secret-1234")
    logging.getLogger("aiohttp.client").error("POST hooks.slack.com/services/T0/B0/XXXXSECRET failed")
    try:
        raise ValueError("token ghp_abcdefghijklmnop0123456789 refused")
    except ValueError:
        log.exception("github.failed")
    text = stderr.text()
    for secret in ("pa55word", "registered-secret-1234", "XXXXSECRET", "ghp_abcdefghijklmnop0123456789"):
        assert secret not in text
    lines = stderr.lines()
    assert lines[0]["url"] == "amqp://incidentd:***@mq:5672/"
    assert "hooks.slack.com/services/***" in lines[1]["event"]


def test_identical_warnings_are_written_once_per_window_with_a_count() -> None:
    """The same warning for message after message (a database outage) passes once per window; the first
    one after the window says how many were held back. Other lines, dead letters and shutdown hand-backs
    always pass."""
    now = [0.0]
    limiter = RepeatLimiter(window=10, clock=lambda: now[0])

    def passes(method: str, **fields: Any) -> dict[str, Any] | None:
        try:
            return dict(limiter(None, method, {"event": "message.retry", **fields}))
        except structlog.DropEvent:
            return None

    assert passes("warning", reason="db down", message_id="1") is not None
    for n in range(2, 50):
        assert passes("warning", reason="db down", message_id=str(n)) is None
    assert passes("warning", reason="other", message_id="x") is not None
    assert passes("info", reason="db down") is not None
    dead = {"event": "message.dead_lettered", "reason": "db down"}
    assert limiter(None, "error", dict(dead)) and limiter(None, "error", dict(dead))
    handed_back = {"event": "message.retry", "reason": "worker is shutting down; not started", "delay": 0.0}
    assert limiter(None, "warning", dict(handed_back)) and limiter(None, "warning", dict(handed_back))
    now[0] = 11.0
    assert passes("warning", reason="db down", message_id="50") == {
        "event": "message.retry", "reason": "db down", "message_id": "50", "repeated": 48,
    }  # fmt: skip


def test_stored_reasons_are_redacted() -> None:
    """Dead-letter and retry reasons travel with the message and into the event lake: an error text
    carrying a webhook URL or a URL password is masked before it is stored."""
    reason = "permanent error: Slack webhook: InvalidURL: hooks.slack.com/services/T1/B2/abcdef"
    assert Outcome.dead_letter(reason).reason.endswith("hooks.slack.com/services/***")
    retry = Outcome.retry(1.0, "OSError: cannot connect to postgresql://app:hunter2@db/app")
    assert retry.reason == "OSError: cannot connect to postgresql://app:***@db/app"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqps://user:p%40ss@mq.example:5671/prod", "amqps://user:***@mq.example:5671/prod"),
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test"),
        ("http://127.0.0.1:8080/path", "http://127.0.0.1:8080/path"),
        ("https://hooks.slack.com/services/T1/B2/secret", "https://hooks.slack.com/services/***"),
        ("Authorization: token ghp_0123456789abcdef0123", "Authorization: ***"),
        ("GET /x?access_token=abc123&page=2", "GET /x?access_token=***&page=2"),
        ("xoxb-1234567890-abcdefghij", "***"),
        ("message.acked in 3.2 ms", "message.acked in 3.2 ms"),
    ],
)
def test_redact_masks_secret_shapes_only(text: str, expected: str) -> None:
    """What looks like a credential is masked; ordinary text, and URLs without one, are left alone."""
    assert redact(text) == expected


def test_a_logger_cached_before_logging_is_configured_again_runs_the_new_processors(stderr: Stderr) -> None:
    """Loggers are cached on first use; configuring logging again in one process (a second command, a
    test) must still reach them: their events go through the new processor chain (here the capture of
    structlog.testing), not the chain they were cached with."""
    from structlog.testing import capture_logs

    log = structlog.get_logger("incidentd.test")
    log.info("first")
    configure_logging("json", "info", stream=Stderr().stream, repeat_window=10)
    with capture_logs() as captured:
        log.info("second")
    assert [entry["event"] for entry in captured] == ["second"]
    assert [line["event"] for line in stderr.lines()] == ["first"]


def test_timestamps_are_iso_utc_with_microseconds_across_second_boundaries(stderr: Stderr) -> None:
    """Every line's timestamp reads as structlog's ISO UTC stamps did (``...T11:20:59.250000Z``), also
    when consecutive lines fall in different seconds (the text of a second is reused within it)."""
    from datetime import UTC, datetime

    times = iter([1_795_000_859.25, 1_795_000_859.75, 1_795_000_860.125, 1_795_000_860.5])
    clock = IsoClock(lambda: next(times))
    stamps = [clock.now() for _ in range(4)]
    assert stamps == [
        "2026-11-18T11:20:59.250000Z", "2026-11-18T11:20:59.750000Z",
        "2026-11-18T11:21:00.125000Z", "2026-11-18T11:21:00.500000Z",
    ]  # fmt: skip
    structlog.get_logger("incidentd.test").info("message.acked", duration_ms=1.5)
    [line] = stderr.lines()
    written = datetime.strptime(line["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - written).total_seconds()) < 60
    assert line["level"] == "info" and line["event"] == "message.acked" and line["duration_ms"] == 1.5
