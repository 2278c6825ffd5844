"""The ClickHouse event lake against a real clickhouse-server (Debian's 18.16 locally and in CI)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from application.messages import Message, Outcome
from tests.lake.server import ClickHouseServer
from tests.standins.clickhouse import select, wait_for_rows

pytestmark = pytest.mark.integration


def message(n: int, **attributes: str) -> Message:
    return Message(
        body=b'{"n": %d}' % n,
        attributes={"type": "incident.create", **attributes},
        message_id=f"m-{n}",
        attempt=1,
    )


async def wait_until(condition: Any, within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_full_batch_is_written_with_the_outcome_of_each_message(
    clickhouse: ClickHouseServer, table: str, make_lake: Any
) -> None:
    """Once batch_size rows are buffered they reach ClickHouse (no waiting for the interval or close),
    one row per message carrying its id, type, outcome, reason, attempt, duration, broker, attributes
    and body, in a table partitioned by month."""
    lake = await make_lake(batch_size=3, flush_interval=3600)
    before = datetime.now(UTC).replace(microsecond=0)
    lake.record(message(1, tenant="blue"), "incident.create", Outcome.ack(), 0.0125)
    lake.record(
        Message(body=b"{bad", attributes={}, message_id="m-2", attempt=3),
        "unknown",
        Outcome.dead_letter("body is not valid JSON", error="DecodeError"),
        0.001,
    )
    lake.record(message(3), "incident.create", Outcome.retry(5.0, "store unavailable"), 2.5)

    assert await wait_for_rows(clickhouse, table, 3) == 3
    rows = {r["message_id"]: r for r in await select(clickhouse, f"SELECT * FROM default.{table}")}
    first, second, third = rows["m-1"], rows["m-2"], rows["m-3"]
    assert (first["command_type"], first["outcome"], first["broker"]) == ("incident.create", "ack", "memory")
    assert first["attributes_keys"] == ["tenant", "type"]
    assert first["attributes_values"] == ["blue", "incident.create"]
    assert first["body"] == '{"n": 1}'
    assert first["duration_ms"] == pytest.approx(12.5)
    assert (second["outcome"], second["reason"], second["error"], second["attempt"]) == (
        "dead_letter",
        "body is not valid JSON",
        "DecodeError",
        3,
    )
    assert (third["outcome"], third["reason"]) == ("retry", "store unavailable")
    received = datetime.fromisoformat(first["received_at"]).replace(tzinfo=UTC)
    assert before.timestamp() - 2 <= received.timestamp() <= datetime.now(UTC).timestamp() + 1
    parts = await select(clickhouse, f"SELECT DISTINCT partition FROM system.parts WHERE table = '{table}'")
    assert [p["partition"] for p in parts] == [received.strftime("%Y%m")]


async def test_a_partial_batch_is_written_on_the_flush_interval(
    clickhouse: ClickHouseServer, table: str, make_lake: Any
) -> None:
    """Fewer rows than a batch still reach ClickHouse after flush_interval, without closing the lake."""
    lake = await make_lake(batch_size=1000, flush_interval=0.2)
    for n in range(4):
        lake.record(message(n), "incident.create", Outcome.ack(), 0.001)
    assert await wait_for_rows(clickhouse, table, 4) == 4
    # The rows can be visible a moment before the insert call returns and the lake counts them.
    await wait_until(lambda: lake.written == 4, within=5)


async def test_close_flushes_a_partial_batch(
    clickhouse: ClickHouseServer, table: str, make_lake: Any
) -> None:
    """Rows buffered when the worker shuts down (SIGTERM -> close) are in ClickHouse when close returns."""
    lake = await make_lake(batch_size=1000, flush_interval=3600)
    for n in range(7):
        lake.record(message(n), "incident.create", Outcome.ack(), 0.001)
    await lake.close()
    count = await select(clickhouse, f"SELECT count() AS n FROM default.{table}")
    assert int(count[0]["n"]) == 7
    assert (lake.written, lake.dropped, lake.buffered) == (7, 0, 0)


async def test_an_outage_never_holds_up_processing_and_the_newest_rows_arrive_afterwards(
    clickhouse: ClickHouseServer, table: str, make_lake: Any
) -> None:
    """While ClickHouse hangs, recording outcomes carries on at once; past buffer_limit the oldest rows
    are dropped and counted; when ClickHouse answers again the buffered rows are written."""
    lake = await make_lake(batch_size=5, buffer_limit=10, flush_interval=0.05, timeout=1.0)
    clickhouse.pause()
    for n in range(5):
        lake.record(message(n), "incident.create", Outcome.ack(), 0.001)
    await wait_until(lambda: lake.buffered == 0)  # the flusher took the batch; its insert now hangs

    processed = 0
    for n in range(5, 25):  # a dispatcher carrying on with more messages meanwhile
        lake.record(message(n), "incident.create", Outcome.ack(), 0.001)
        processed += 1
        await asyncio.sleep(0)
    assert processed == 20
    assert (lake.written, lake.flush_failures) == (0, 0), "processing finished while the insert still hung"
    assert (lake.buffered, lake.dropped) == (10, 10)

    await wait_until(lambda: lake.flush_failures >= 1)  # the hung batch timed out and went back
    clickhouse.resume()
    assert await wait_for_rows(clickhouse, table, 10) == 10
    ids = await select(clickhouse, f"SELECT message_id FROM default.{table} ORDER BY message_id")
    assert sorted(int(r["message_id"][2:]) for r in ids) == list(range(15, 25))
    assert (lake.written, lake.dropped) == (10, 15)


async def test_close_during_an_outage_returns_within_its_timeout_and_counts_the_loss(
    clickhouse: ClickHouseServer, table: str, make_lake: Any
) -> None:
    """A SIGTERM while ClickHouse is down does not hang the worker: close gives up after close_timeout
    and reports the rows it could not write as dropped."""
    lake = await make_lake(batch_size=100, flush_interval=3600, timeout=0.3, close_timeout=0.8)
    clickhouse.pause()
    for n in range(3):
        lake.record(message(n), "incident.create", Outcome.ack(), 0.001)
    await asyncio.wait_for(lake.close(), timeout=10)
    assert (lake.written, lake.dropped, lake.buffered) == (0, 3, 0)
    lake.record(message(9), "incident.create", Outcome.ack(), 0.001)
    assert lake.dropped == 4, "a row recorded after close is counted, not kept"


async def test_the_table_is_recreated_if_dropped_while_running(
    clickhouse: ClickHouseServer, table: str, make_lake: Any
) -> None:
    """Dropping the table (e.g. by an operator resetting the lake) costs one failed flush, not the lake:
    the next flush creates the table again and the buffered rows arrive."""
    lake = await make_lake(batch_size=1, flush_interval=0.05)
    lake.record(message(1), "incident.create", Outcome.ack(), 0.001)
    assert await wait_for_rows(clickhouse, table, 1) == 1
    await asyncio.to_thread(clickhouse.query, f"DROP TABLE default.{table}")
    lake.record(message(2), "incident.create", Outcome.ack(), 0.001)
    assert await wait_for_rows(clickhouse, table, 1) == 1
    ids = await select(clickhouse, f"SELECT message_id FROM default.{table}")
    assert [r["message_id"] for r in ids] == ["m-2"]
