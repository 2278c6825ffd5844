"""The examples in examples/ run as the README says."""

from __future__ import annotations

import json
import os
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


def test_the_example_config_runs_the_quick_start_feed_with_its_action_rules_in_dry_run(tmp_path):
    """`--config examples/incidentd.json` (dry_run on, adapters off: no server needed) answers the
    feed's checkout alerts with the 5xx rule: the incidents' timelines say what would be restarted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INCIDENTD_")}
    env["INCIDENTD_SQLITE_PATH"] = str(tmp_path / "incidentd.db")  # the environment wins over the file
    app = [sys.executable, str(ROOT / "app.py"), "--config", str(ROOT / "examples" / "incidentd.json")]
    feed = str(ROOT / "examples" / "events.jsonl")
    worker = subprocess.run(
        [*app, "worker", "--from", feed], env=env, capture_output=True, text=True, timeout=60
    )
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.startswith("messages: 8 acked, 5 dead-lettered, 0 retried")
    listed = subprocess.run(
        [*app, "incidents", "list", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    checkout = [i for i in json.loads(listed.stdout) if i["service"] == "checkout"]
    assert len(checkout) == 2
    for incident in checkout:
        [result] = [e["note"] for e in incident["timeline"] if e["kind"] == "action"]
        assert result == (
            "restart-checkout-on-5xx: would restart deployment shop/checkout "
            "(dry run; kubernetes adapter disabled, nothing checked)"
        )
