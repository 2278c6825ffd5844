"""``worker --from``: feed a JSON-lines file (or stdin) into the embedded broker, one message per line.

The file format (README "Feeding a file"): each line is an envelope or a raw body.

* An envelope is a JSON object with ``data`` (any JSON value, re-serialised compactly) or ``data_base64``
  (the exact body bytes: non-JSON, empty, duplicate keys, anything), and optionally ``type`` (string),
  ``attributes`` (an object of string values, carried as they are) and ``id`` (the message id).
* Any other line (not JSON, or JSON that is not an envelope) is the body itself, so that it is
  dead-lettered with its reason rather than dropped.

An envelope that breaks these rules (an attribute that is not a string, bad base64, ...) is dead-lettered
here with the rule it broke: guessing (``true`` -> ``"True"``) would change the message. Each line's
message id is its ``id`` or a digest of the line, so feeding the same file again is a redelivery of
the same messages: the store's idempotency records make it change nothing.

The reader streams (a bounded number of messages are queued or running at once) and counts outcomes
per message: a message is finished when it is acked or dead-lettered, however many attempts it took.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import structlog

from application.messages import ATTEMPT_ATTR, FIRST_SEEN_ATTR, TYPE_ATTR, Disposition, Message, Outcome
from application.ports import DeadLetter
from infra.memory.broker import MemoryBroker

log = structlog.get_logger("incidentd.feed")

MAX_LINE = 16 * 1024 * 1024  # longer lines are dead-lettered (their first bytes kept), never held whole
_ENVELOPE_KEYS = {"type", "attributes", "data", "data_base64", "id"}
_ATTEMPT = re.compile(r"[1-9][0-9]{0,5}")
_FEED_ERROR = "FeedError"


@dataclass(frozen=True, slots=True)
class Line:
    """One fed message: body, attributes and id, or the ``problem`` that makes it a dead letter."""

    body: bytes
    attributes: dict[str, str]
    message_id: str
    problem: str = ""


def parse(raw: bytes) -> Line | None:
    """The message a line carries (None for a blank line); never raises, whatever the line holds."""
    line = raw.rstrip(b"\r\n")
    if not line.strip():
        return None
    message_id = "feed-" + hashlib.sha256(line).hexdigest()[:32]
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, invalid UTF-8, too deep, too many digits
        return Line(line, {}, message_id)
    if not (isinstance(doc, dict) and doc.keys() & {"data", "data_base64"} and doc.keys() <= _ENVELOPE_KEYS):
        return Line(line, {}, message_id)
    try:
        return _envelope(doc, line, message_id)
    except (ValueError, RecursionError) as exc:
        return Line(line, {}, message_id, f"invalid envelope: {exc}")


def _envelope(doc: dict[str, Any], line: bytes, message_id: str) -> Line:
    if "data" in doc and "data_base64" in doc:
        raise ValueError("give either data or data_base64, not both")
    if "data_base64" in doc:
        if not isinstance(doc["data_base64"], str):
            raise ValueError("data_base64 must be a string")
        try:
            body = base64.b64decode(doc["data_base64"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"data_base64 is not base64: {exc}") from None
    else:
        body = json.dumps(doc["data"], separators=(",", ":")).encode()
    attributes = doc.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError("attributes must be an object of strings")
    for key, value in attributes.items():
        if not isinstance(value, str):
            kind = type(value).__name__
            raise ValueError(
                f"attribute {key!r} must be a string, not {kind} (quote it: {json.dumps(value)!r})"
            )
    if "type" in doc:
        if not isinstance(doc["type"], str) or not doc["type"]:
            raise ValueError("type must be a non-empty string")
        attributes = {**attributes, TYPE_ATTR: doc["type"]}
    _check_bookkeeping(attributes)
    if "id" in doc:
        if not isinstance(doc["id"], str) or not doc["id"].strip() or len(doc["id"]) > 200:
            raise ValueError("id must be a non-empty string of at most 200 characters")
        message_id = doc["id"]
    return Line(body, attributes, message_id)


def _check_bookkeeping(attributes: dict[str, str]) -> None:
    """incidentd's own attempt / first-seen attributes, if a line carries them, must be what incidentd
    would write: the embedded broker reads them as numbers and times."""
    attempt = attributes.get(ATTEMPT_ATTR)
    if attempt is not None and not _ATTEMPT.fullmatch(attempt):
        raise ValueError(f"attribute {ATTEMPT_ATTR!r} must be a whole number from 1 to 999999")
    first_seen = attributes.get(FIRST_SEEN_ATTR)
    if first_seen is not None:
        try:
            seen = datetime.fromisoformat(first_seen)
        except ValueError:
            raise ValueError(f"attribute {FIRST_SEEN_ATTR!r} must be an ISO 8601 time") from None
        if seen.tzinfo is None:
            raise ValueError(f"attribute {FIRST_SEEN_ATTR!r} needs a timezone offset")


def read_lines(stream: IO[bytes], count: int) -> list[bytes]:
    """Up to ``count`` lines (fewer at the end); a line longer than MAX_LINE comes back cut to MAX_LINE
    bytes without its newline, the rest of it skipped."""
    lines: list[bytes] = []
    while len(lines) < count:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            break
        if len(line) > MAX_LINE:
            while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            line = line[:MAX_LINE]
        lines.append(line)
    return lines


@dataclass
class Feed:
    """Feeds lines into a memory broker and counts each message's final outcome (its ``observe`` is one
    of the dispatcher's observers, given to the container when it is built)."""

    window: int = 1000  # messages read but not finished (queued, running or waiting for redelivery)
    read: int = 0  # messages read (blank lines skipped)
    acked: int = 0
    dead_lettered: int = 0
    retried: set[str] = field(default_factory=set)  # ids of messages redelivered at least once
    finished: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def in_flight(self) -> int:
        return self.read - self.finished

    def observe(self, message: Message, command_type: str, outcome: Outcome, duration: float) -> None:
        if outcome.disposition is Disposition.RETRY:
            self.retried.add(message.message_id)
            return
        if outcome.disposition is Disposition.ACK:
            self.acked += 1
        else:
            self.dead_lettered += 1
        self.finished += 1
        if self.in_flight <= self.window // 2:
            self._changed.set()

    async def run(self, broker: MemoryBroker, lines: AsyncIterator[bytes], stop: asyncio.Event) -> None:
        """Publish every line into ``broker`` (waiting while ``window`` messages are unfinished) until the
        lines end or ``stop`` is set; then wait until every published message is finished (or ``stop``)."""
        async for raw in lines:
            if stop.is_set():
                return
            parsed = parse(raw)
            if parsed is None:
                continue
            if self.in_flight >= self.window:  # full: refill once half of the window has finished
                while self.in_flight > self.window // 2 and not stop.is_set():
                    await self._wait_change(stop)
            if stop.is_set():
                return
            self.read += 1
            if parsed.problem:
                await self._reject(broker, parsed)
            else:
                publish = broker.publisher.publish
                await publish(parsed.body, parsed.attributes, message_id=parsed.message_id)
        while self.in_flight and not stop.is_set():
            await self._wait_change(stop)

    async def _wait_change(self, stop: asyncio.Event) -> None:
        self._changed.clear()
        changed, stopped = asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            stopped.cancel()

    async def _reject(self, broker: MemoryBroker, line: Line) -> None:
        """A line that breaks the feed format: a dead letter with the rule it broke, logged like one."""
        now = datetime.now(UTC)
        await broker.dead_letters.add(
            DeadLetter(line.message_id, line.body, line.attributes, line.problem, _FEED_ERROR, 1, now, now)
        )
        log.error("message.dead_lettered", message_id=line.message_id, attempt=1, duration_ms=0.0,
                  reason=line.problem, error=_FEED_ERROR)  # fmt: skip
        self.dead_lettered += 1
        self.finished += 1

    def counts(self) -> dict[str, int]:
        return {"read": self.read, "acked": self.acked, "dead_lettered": self.dead_lettered,
                "retried": len(self.retried), "in_flight": self.in_flight}  # fmt: skip


async def stream_lines(stream: IO[bytes], *, batch: int) -> AsyncIterator[bytes]:
    """The stream's lines, ``batch`` at a time (1 for stdin, so that a pipe is not held up).

    Read by a daemon thread a few batches ahead: a read blocked on a silent stdin never holds up the
    process's exit after Ctrl-C, as a thread of the event loop's default executor would.
    """
    loop = asyncio.get_running_loop()
    batches: asyncio.Queue[list[bytes] | BaseException] = asyncio.Queue()
    room = threading.Semaphore(4)

    def hand_over(item: list[bytes] | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is reading any more
            loop.call_soon_threadsafe(batches.put_nowait, item)

    def read() -> None:
        try:
            while room.acquire():
                lines = read_lines(stream, batch)
                hand_over(lines)
                if not lines:
                    return
        except BaseException as exc:
            hand_over(exc)

    threading.Thread(target=read, name="feed-reader", daemon=True).start()
    while True:
        item = await batches.get()
        if isinstance(item, BaseException):
            raise item
        if not item:
            return
        room.release()
        for line in item:
            yield line


async def report_progress(feed: Feed, interactive: bool, total_bytes: int | None, position: Callable[[], int],
                          every: float = 5.0) -> None:  # fmt: skip
    """Until cancelled: a progress bar on a terminal (rich, stderr), else one ``feed.progress`` log line
    every ``every`` seconds."""
    if not interactive:
        while True:
            await asyncio.sleep(every)
            log.info("feed.progress", **feed.counts())
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("feeding", total=total_bytes)
        started = time.monotonic()
        while True:
            c = feed.counts()
            rate = c["read"] / max(time.monotonic() - started, 1e-3)
            bar.update(task, completed=position(), description=(
                f"{c['read']:,} read ({rate:,.0f}/s): {c['acked']:,} acked, {c['dead_lettered']:,} "
                f"dead-lettered, {c['in_flight']:,} in flight"))  # fmt: skip
            await asyncio.sleep(0.2)
