"""Shared helpers of the ops tests: the repository root and rendering kustomize overlays."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services import require

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "overlays").iterdir() if p.is_dir())


def kubectl() -> str:
    """The kubectl to render with: $KUBECTL (to try another version) or the one on PATH."""
    found = shutil.which(os.environ.get("KUBECTL", "kubectl"))
    require(found is not None, "kubectl", "bash .ci/install-ops.sh")
    assert found is not None
    return found


@cache
def _render(binary: str, overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [binary, "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return _render(kubectl(), overlay)
