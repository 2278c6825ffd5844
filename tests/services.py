"""Reaching the real services integration tests run against.

Locally a missing service skips the test with the command that starts it; in CI (``CI=true``) a missing
service fails the test, because a skipped integration test proves nothing.
"""

from __future__ import annotations

import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(available: bool, what: str, start_with: str) -> None:
    """Fail (in CI) or skip (elsewhere) unless ``available``."""
    if available:
        return
    message = f"{what} is not reachable; start it with: {start_with}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
