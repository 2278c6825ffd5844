from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_json(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def payload() -> Any:
    """``payload("alertmanager_firing")``: a real payload from tests/fixtures, as a dict."""
    return fixture_json
