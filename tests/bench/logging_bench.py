"""What the log pipeline costs per line: the worker's per-message ``message.acked`` line (info) and a
``message.retry`` line (warning, through the repeat limiter), written as JSON to /dev/null.

A is a plain structlog JSON set-up (contextvars, level, timestamp, orjson; what incidentd had before the
standard-library routing, redaction and repeat limiter); B is ``common.logging.configure_logging``.
Rounds alternate A B A B ... and the median per line is printed.

    python tests/bench/logging_bench.py [--lines 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import orjson
import structlog

from common.logging import configure_logging


def plain(stream: object) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.BytesLoggerFactory(stream.buffer),  # type: ignore[attr-defined]
        cache_logger_on_first_use=False,
    )


def run(lines: int, event: str) -> float:
    log = structlog.get_logger("incidentd.dispatcher")
    structlog.contextvars.bind_contextvars(message_id="0f3c9a7e5b2d4c1e8a6f", attempt=1, command_type="x.y")
    emit = log.info if event == "message.acked" else log.warning
    started = time.perf_counter()
    for n in range(lines):
        if event == "message.acked":
            emit(event, duration_ms=1.234)
        else:
            emit(event, duration_ms=1.234, delay=5.0, reason=f"PostgreSQL unavailable: refused {n % 3}")
    return (time.perf_counter() - started) / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sink = open(os.devnull, "w")  # noqa: SIM115 - open for the whole run
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for side, setup in (("A", plain), ("B", lambda s: configure_logging("json", "info", stream=s))):
            for event in ("message.acked", "message.retry"):
                structlog.reset_defaults()
                setup(sink)
                results.setdefault((side, event), []).append(run(args.lines, event))
    print(f"{'line':16} {'A us/line':>10} {'B us/line':>10} {'B/A':>6}")
    for event in ("message.acked", "message.retry"):
        a = statistics.median(results["A", event])
        b = statistics.median(results["B", event])
        print(f"{event:16} {a:10.2f} {b:10.2f} {b / a:6.2f}")


if __name__ == "__main__":
    main()
