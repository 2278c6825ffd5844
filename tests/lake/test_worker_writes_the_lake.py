"""The container wires the event lake into a real worker run."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from app import cli
from tests.lake.server import ClickHouseServer

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "events.jsonl"


def test_every_message_of_a_worker_run_is_in_the_lake_when_the_worker_exits(
    clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    """With clickhouse_enabled, `incidentd worker --from` writes one row per processed message, and the
    rows still buffered at exit (the flush interval is an hour) are flushed on shutdown."""
    table = f"worker_{uuid.uuid4().hex[:12]}"
    env = {
        "INCIDENTD_SQLITE_PATH": str(tmp_path / "incidentd.db"),
        "INCIDENTD_CLICKHOUSE_ENABLED": "true",
        "INCIDENTD_CLICKHOUSE_HOST": clickhouse.host,
        "INCIDENTD_CLICKHOUSE_PORT": str(clickhouse.tcp_port),
        "INCIDENTD_CLICKHOUSE_TABLE": table,
        "INCIDENTD_CLICKHOUSE_FLUSH_INTERVAL": "3600",
    }
    result = CliRunner().invoke(cli, ["worker", "--from", str(EXAMPLE)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    lines = [line for line in EXAMPLE.read_text().splitlines() if line.strip()]
    rows = [
        json.loads(line)
        for line in clickhouse.query(
            f"SELECT command_type, outcome, broker FROM default.{table} FORMAT JSONEachRow"
        ).splitlines()
    ]
    assert len(rows) == len(lines)
    assert {r["broker"] for r in rows} == {"memory"}
    assert "alertmanager.webhook" in {r["command_type"] for r in rows}
    assert {r["outcome"] for r in rows} <= {"ack", "retry", "dead_letter"}
