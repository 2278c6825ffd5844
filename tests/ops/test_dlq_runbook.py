"""The dead-letter runbook of docs/operations.md, step by step with the real CLI, a real worker process
and the real RabbitMQ: list, show, fix the cause, replay (dry run first), purge (dry run first)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config.settings import Settings
from infra.rabbitmq.topology import Topology
from tests.contract.broker_contract import eventually
from tests.rabbitmq.conftest import queue_depth, rabbitmq, settings  # noqa: F401 - fixtures
from tests.workers import env_of, run_app, sigterm, worker_process


async def test_the_runbook_replays_what_was_fixed_and_purges_what_never_will_be(
    settings: Settings,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """Two dead letters: an acknowledgement that gave up because its incident did not exist yet, and an
    incident.create without a title. `dlq list --limit` and `dlq show` show them with their reasons;
    `dlq replay --dry-run` changes nothing; once the incident exists (the fix), `dlq replay` publishes
    the acknowledgement back and a worker applies it, while the untitled create, which would fail again,
    stays; `dlq purge --dry-run` counts it and deletes nothing, `dlq purge --limit 1 --yes` deletes it."""
    env = env_of({
        "broker": "rabbitmq", "rabbitmq_url": settings.rabbitmq_url,
        "rabbitmq_exchange": settings.rabbitmq_exchange, "rabbitmq_queue": settings.rabbitmq_queue,
        "retry_backoff": [0.2], "max_attempts": 2, "in_process_attempts": 1,
        "sqlite_path": str(tmp_path / "incidentd.db"), "ops_enabled": False, "log_level": "warning",
    })  # fmt: skip
    dlq = Topology.from_settings(settings).dlq

    async def app(*args: str, stdin: bytes = b"") -> str:
        code, out = await run_app(env, *args, stdin=stdin)
        assert code == 0, f"app.py {' '.join(args)}: {out}"
        return out

    async def dead_letters() -> list[dict[str, Any]]:
        return json.loads(await app("dlq", "list", "--json"))  # type: ignore[no-any-return]

    async def dlq_holds(count: int) -> bool:
        return await queue_depth([dlq]) == count

    await app("setup")
    ack = (await app("publish", "incident.acknowledge", "-", stdin=b'{"dedup_key": "db-down"}')).strip()
    untitled = (await app("publish", "incident.create", "-", stdin=b'{"title": ""}')).strip()
    log = tmp_path / "worker.log"
    with worker_process(env, log) as worker:
        await eventually(lambda: dlq_holds(2), timeout=30)
        assert await sigterm(worker) == 0, log.read_text()[-3000:]

    # 2. list, 3. inspect
    letters = {x["message_id"]: x for x in await dead_letters()}
    assert set(letters) == {ack, untitled}
    assert "gave up after 2 attempts" in letters[ack]["reason"]
    assert "title" in letters[untitled]["reason"]
    assert len((await app("dlq", "list", "--limit", "1")).splitlines()) == 1
    shown = json.loads(await app("dlq", "show", ack))
    assert json.loads(shown["body"]) == {"dedup_key": "db-down"}
    assert shown["attributes"]["type"] == "incident.acknowledge"

    # 5. replay: the dry run changes nothing
    assert "would replay 1; left 1" in await app("dlq", "replay", "--dry-run")
    assert await dlq_holds(2)

    # 4. fix the cause (the incident now exists), then 5. replay for real; a worker applies it
    await app("publish", "incident.create", "-", stdin=b'{"title": "db down", "dedup_key": "db-down"}')
    with worker_process(env, log) as worker:
        await eventually(lambda: _incident_status(app, "db-down", "open"), timeout=30)
        assert "replayed 1; left 1" in await app("dlq", "replay")
        await eventually(lambda: _incident_status(app, "db-down", "acknowledged"), timeout=30)
        assert await sigterm(worker) == 0, log.read_text()[-3000:]
    assert [x["message_id"] for x in await dead_letters()] == [untitled]

    # 6. purge: the dry run counts, --limit bounds it
    assert "would delete 1" in await app("dlq", "purge", "--dry-run")
    assert await dlq_holds(1)
    assert "deleted 1" in await app("dlq", "purge", "--limit", "1", "--yes")
    assert await dead_letters() == []


async def _incident_status(app: Any, dedup_key: str, status: str) -> bool:
    incidents = json.loads(await app("incidents", "list", "--json"))
    return any(i["dedup_key"] == dedup_key and i["status"] == status for i in incidents)
