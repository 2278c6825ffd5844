"""The Pub/Sub emulator for the session (tests/pubsub/emulator.py), shared by tests/pubsub and the
Pub/Sub variant of tests/ops/test_rolling_restart.py: one emulator per session, however many suites
use it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pubsub import emulator
from tests.services import require


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[str]:
    """``host:port`` of the emulator; PUBSUB_EMULATOR_HOST is set for the session (and so for the
    worker processes tests start)."""
    script = emulator.launcher()
    require(script is not None, f"the Pub/Sub emulator ({emulator.PACKAGE}) and Java", emulator.START_WITH)
    assert script is not None
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    with emulator.running(script) as host:
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        try:
            yield host
        finally:
            if previous is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous
