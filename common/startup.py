"""Waiting for a server at start-up: retry with backoff (tenacity) until it answers or a deadline passes.

In Kubernetes the broker, the database and the worker often start together; a worker that exits at the
first refused connection only turns that into a CrashLoopBackOff with a traceback. Instead each attempt
is one log line (``startup.waiting``: which server, where - password masked -, the attempt, the error, the
next try), the caller's ``/readyz`` says 503 meanwhile, and after the deadline the error is one sentence.

Errors that no amount of waiting fixes - a programming or configuration error (``ValueError``,
``TypeError``, ``LookupError``, ``AttributeError``, ``ImportError``, missing Google credentials) - end the
wait at once. Anything else (refused, DNS, wrong password, missing vhost or database, timeouts) may be
a server still starting or a Secret still being rotated, and is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    wait_exponential_jitter,
)

from common.redact import describe, redact

T = TypeVar("T")
log = structlog.get_logger("incidentd.startup")

_FINAL = (ValueError, TypeError, LookupError, AttributeError, ImportError, NotImplementedError)


class StartupError(Exception):
    """A server did not answer before the start-up deadline (or cannot ever); the message is one line."""


class Stopped(Exception):
    """SIGTERM / SIGINT arrived while waiting: stop waiting, exit cleanly."""


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, _FINAL):
        return False
    # google.auth.exceptions.DefaultCredentialsError: no credentials on this machine; waiting won't help.
    return type(exc).__name__ != "DefaultCredentialsError"


async def wait_for(
    service: str,
    target: str,
    connect: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    stop: asyncio.Event | None = None,
    max_delay: float = 5.0,
) -> T:
    """``await connect()`` until it succeeds, retrying for up to ``timeout`` seconds in all.

    Raises :class:`StartupError` (one line naming ``service`` and ``target``) when the time is up or the
    error is final, and :class:`Stopped` when ``stop`` is set while waiting.
    """
    started = time.monotonic()
    shown = redact(target)

    def remaining() -> float:
        return max(timeout - (time.monotonic() - started), 0.01)

    async def sleep(seconds: float) -> None:
        if stop is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            return
        raise Stopped

    def waiting(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "startup.waiting", service=service, target=shown, attempt=state.attempt_number,
            error=describe(exc) if exc else "", retry_in=round(state.upcoming_sleep, 2),
            waited=round(time.monotonic() - started, 1), timeout=round(timeout, 1),
        )  # fmt: skip

    retrying = AsyncRetrying(
        stop=stop_before_delay(timeout),
        wait=wait_exponential_jitter(initial=0.5, max=max_delay, jitter=0.5),
        retry=retry_if_exception(retryable),
        before_sleep=waiting,
        sleep=sleep,
        reraise=True,
    )
    attempts = 0
    try:
        async for attempt in retrying:
            with attempt:
                attempts += 1
                async with asyncio.timeout(remaining()):
                    result = await connect()
    except (Stopped, asyncio.CancelledError):
        raise
    except Exception as exc:
        waited = time.monotonic() - started
        error = "no answer in time (TimeoutError)" if isinstance(exc, TimeoutError) else describe(exc)
        gave_up = f" (gave up after {attempts} attempts in {waited:.0f}s)" if retryable(exc) else ""
        raise StartupError(f"cannot connect to the {service} at {shown}: {error}{gave_up}") from exc
    if attempts > 1:
        log.info("startup.connected", service=service, target=shown, attempts=attempts,
                 waited=round(time.monotonic() - started, 1))  # fmt: skip
    return result
