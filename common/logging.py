"""structlog set-up: JSON lines on stderr by default (one object per line, for log shippers), or a
human console format. Per-message fields (message_id, command_type, attempt) come from
``structlog.contextvars``, bound by the dispatcher for the task that handles the message."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
        factory: Any = structlog.PrintLoggerFactory(stream)
    else:
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        # JSON goes out as bytes (orjson) straight to the text stream's binary buffer.
        factory = structlog.BytesLoggerFactory(stream.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
