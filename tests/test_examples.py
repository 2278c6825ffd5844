"""The examples in examples/ run as the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_add_a_command_example_handles_its_new_command():
    """The README's 'add a command' example registers a new command and its handler changes an incident."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "add_a_command.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "note       maintenance  maintenance 22:00-23:00 UTC: database failover drill" in result.stdout
