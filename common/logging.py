"""structlog set-up: JSON lines on stderr by default (one object per line, for log shippers), or a
human console format. Per-message fields (message_id, command_type, attempt) come from
``structlog.contextvars``, bound by the dispatcher for the task that handles the message.

Everything that reaches stderr goes through the same processors and the same locked writer: incidentd's
own structlog loggers, the standard-library loggers of the client libraries (aio-pika, aiormq, asyncpg,
google, asyncio; through structlog's ``ProcessorFormatter``), warnings, and exceptions escaping a thread.
So stderr stays one JSON object per line, tracebacks included (as a ``exception`` list, without local
variables: frames of a handler hold payloads, incident data and HTTP headers), secrets are masked
(:mod:`common.redact`), and a warning or error repeated many times within ``repeat_window`` seconds (a
database outage seen by every message) is written once per window with a count of the lines held back.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

from common.redact import redact

# Fields that differ from one message to the next: two lines that differ only in these are "the same".
_PER_MESSAGE = frozenset(
    {"timestamp", "message_id", "attempt", "duration_ms", "delay", "incident_id", "idempotency_key"}
)
# Lines never held back: each names a message that left the queue for good, or a start-up attempt.
_ALWAYS = frozenset({"message.dead_lettered", "startup.waiting"})
_WARNING = logging.WARNING
_LEVELS = {**logging.getLevelNamesMapping(), "EXCEPTION": logging.ERROR}
# Values of these keys are incidentd's own identifiers or numbers: never secrets, never scanned.
# Client libraries' informational lines ("Reconnecting after 5 seconds" for a connection that is not
# reconnecting) are not the worker's events: below debug, only their warnings and errors are written.
_CHATTY = (
    "aio_pika",
    "aiormq",
    "asyncpg",
    "google",
    "grpc",
    "urllib3",
    "botocore",
    "aiobotocore",
    "kubernetes_asyncio",
)
_SAFE_KEYS = frozenset({"level", "timestamp", "logger", "message_id", "command_type", "attempt"})


class RepeatLimiter:
    """A processor: the first of a run of identical warning-or-worse lines passes; the others within
    ``window`` seconds are dropped; the first one after the window passes with ``repeated`` (how many
    were dropped since the last one written). ``window`` 0 passes everything."""

    def __init__(self, window: float, clock: Any = time.monotonic, max_keys: int = 1000) -> None:
        self._window = window
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [window start, dropped]
        self._lock = threading.Lock()

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        if self._window <= 0 or _LEVELS.get(method.upper(), logging.INFO) < _WARNING:
            return event_dict
        # A hand-back at shutdown (RETRY with delay 0) is bounded by the prefetch and tells the drain's story.
        if event_dict.get("event") in _ALWAYS or event_dict.get("delay", None) == 0:
            return event_dict
        key = _identity(method, event_dict)
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self._window:
                entry[1] += 1
                raise structlog.DropEvent
            if entry is not None and entry[1]:
                event_dict["repeated"] = int(entry[1])
            if len(self._seen) >= self._max_keys:
                self._seen.clear()
            self._seen[key] = [now, 0]
        return event_dict


def _identity(method: str, event_dict: Mapping[str, Any]) -> tuple[Any, ...]:
    fields = []
    for name, value in sorted(event_dict.items()):
        if name in _PER_MESSAGE:
            continue
        if name == "exc_info":
            value = _exception_summary(value)
        elif not isinstance(value, str | int | float | bool | None):
            value = repr(value)
        fields.append((name, value))
    return (method, *fields)


def _exception_summary(exc_info: Any) -> str:
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        return f"{type(exc_info).__name__}: {exc_info}"
    if isinstance(exc_info, tuple) and exc_info[1] is not None:
        return f"{exc_info[0].__name__}: {exc_info[1]}"
    return ""


def redact_secrets(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """A processor: every string in the line (tracebacks included) with secrets masked."""
    for name, value in event_dict.items():
        if name in _SAFE_KEYS:
            continue
        if type(value) is str:
            event_dict[name] = redact(value)
        elif isinstance(value, dict | list | tuple):
            event_dict[name] = _redacted(value)
    return event_dict


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


class IsoClock:
    """ISO 8601 UTC timestamps with microseconds (``2026-12-03T19:18:51.123456Z``, as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes them) at the cost of one float split per line: the text
    of the current second is formatted once and reused."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._cached = (-1, "")  # (second, its text): one tuple, so threads never see a torn pair

    def now(self) -> str:
        t = self._clock()
        second = int(t)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, prefix)
        return f"{prefix}.{int((t - second) * 1_000_000):06d}Z"

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["timestamp"] = self.now()
        return event_dict


class _JsonHead:
    """A processor: level, repeat limiter and timestamp in one call - what ``add_log_level``,
    :class:`RepeatLimiter` and ``TimeStamper`` do one after the other, for incidentd's own lines (the
    per-message outcome line is the hot one)."""

    def __init__(self, limiter: RepeatLimiter, clock: IsoClock) -> None:
        self._limiter = limiter
        self._now = clock.now

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["level"] = _METHOD_LEVEL.get(method, method)
        if method != "info" and method != "debug":
            event_dict = self._limiter(logger, method, event_dict)
        event_dict["timestamp"] = self._now()
        return event_dict


class _JsonTail:
    """A processor: exception rendering (only when the line carries one), redaction and the orjson
    rendering in one call; returns the bytes the ``BytesLogger`` writes."""

    def __init__(self, exceptions: Any) -> None:
        self._exceptions = exceptions

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        if "exc_info" in event_dict:
            event_dict = self._exceptions(logger, method, event_dict)
        return orjson.dumps(redact_secrets(logger, method, event_dict))


_METHOD_LEVEL = {"warn": "warning", "exception": "error"}


class _Handler(logging.Handler):
    """Writes standard-library records, rendered by a ``ProcessorFormatter``, through structlog's own
    writer, so that its lock keeps lines from different threads whole."""

    def __init__(self, write: Any) -> None:
        super().__init__()
        self._write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record))
        except structlog.DropEvent:  # held back by RepeatLimiter; a BaseException, never the caller's
            return
        except Exception:
            self.handleError(record)


_installed: _Handler | None = None


def configure_logging(
    fmt: str = "json", level: str = "info", stream: TextIO | None = None, repeat_window: float = 10.0
) -> None:
    global _installed
    stream = stream or sys.stderr
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    limiter, clock = RepeatLimiter(repeat_window), IsoClock()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        limiter,
        clock,
    ]
    # incidentd's own lines, when they have a cheaper chain than the standard library's ``shared + tail``
    own: list[Any] | None = None
    if fmt == "console":
        tail: list[Any] = [redact_secrets, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
        out: Any = structlog.PrintLogger(stream)
        write = out.msg
        factory: Any = structlog.PrintLoggerFactory(stream)
        foreign_renderer: Any = tail[-1]
    else:
        exceptions = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        tail = [exceptions, redact_secrets, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        # JSON goes out as bytes (orjson) straight to the text stream's binary buffer.
        out = structlog.BytesLogger(stream.buffer)
        factory = structlog.BytesLoggerFactory(stream.buffer)

        def write(line: str) -> None:
            out.msg(line.encode())

        foreign_renderer = structlog.processors.JSONRenderer(serializer=_dumps_str)
        own = [structlog.contextvars.merge_contextvars, _JsonHead(limiter, clock), _JsonTail(exceptions)]
    # The list is changed in place, not replaced: a logger cached under an earlier configuration holds
    # this very list, and so follows the new one (and structlog.testing.capture_logs, which edits it).
    processors = structlog.get_config()["processors"]
    processors[:] = own if own is not None else [*shared, *tail]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    handler = _Handler(write)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail[:-1],
                foreign_renderer,
            ],
        )
    )
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    for old in list(root.handlers):  # e.g. a basicConfig() a library ran before us
        if isinstance(old, logging.StreamHandler) and old.stream in (sys.stderr, stream):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(
            logging.NOTSET if numeric_level <= logging.DEBUG else max(numeric_level, logging.WARNING)
        )
    _installed = handler
    logging.captureWarnings(True)
    threading.excepthook = _thread_crashed


def _dumps_str(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    """An exception escaping a thread (a client library's worker) as one JSON line, not a bare traceback."""
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("incidentd").error(
        "thread.crashed",
        thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
