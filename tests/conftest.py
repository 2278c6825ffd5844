from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# Stand-ins shared by the adapter suites and the end-to-end test: fixtures k8s, github, slack, clickhouse;
# and the Pub/Sub emulator, shared by tests/pubsub and tests/ops.
pytest_plugins = (
    "tests.standins.kubernetes",
    "tests.standins.chat",
    "tests.standins.llm",
    "tests.standins.clickhouse",
    "tests.standins.pubsub",
)


def fixture_json(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def payload() -> Any:
    """``payload("alertmanager_firing")``: a real payload from tests/fixtures, as a dict."""
    return fixture_json
