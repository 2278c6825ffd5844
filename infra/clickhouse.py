"""The event lake: one row per processed message and its outcome, in a ClickHouse MergeTree table.

Writing history must never slow message processing down, so :meth:`EventLake.record` (the dispatcher's
outcome observer) only appends a row to an in-memory buffer. A background task inserts the buffer in
batches over ClickHouse's native protocol (asynch) when ``batch_size`` rows are waiting or every
``flush_interval`` seconds; :meth:`EventLake.close` flushes what is left, so a SIGTERM loses nothing
that ClickHouse can take before ``close_timeout``.

While ClickHouse is unreachable the rows stay buffered and the flush is retried with exponential
backoff. The buffer is bounded (``buffer_limit`` rows, plus the at most ``batch_size`` rows of an insert
in flight): past the bound the OLDEST rows are dropped and counted in :attr:`EventLake.dropped`. We drop
rather than block because the lake is a record of what happened, not the system of record - the broker
and the incident store are - and a worker that stops acking because an analytics database is down
would turn a ClickHouse outage into an incident outage.

The schema uses only types and syntax that ClickHouse 18.16 (Debian's package) already understands:
String, UInt32, Float64, Array(String) and DateTime, custom partitioning by month.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from application.messages import Message, Outcome
from common.closing import closing

if TYPE_CHECKING:
    from asynch import Connection

    from config.settings import Settings

log = structlog.get_logger(__name__)

COLUMNS = (
    "received_at",
    "message_id",
    "command_type",
    "outcome",
    "reason",
    "error",
    "attempt",
    "duration_ms",
    "broker",
    "attributes_keys",
    "attributes_values",
    "body",
)
Row = tuple[Any, ...]

_MAX_BACKOFF = 30.0
_FIRST_BACKOFF = 0.5


def create_table_sql(database: str, table: str) -> str:
    """DDL accepted by ClickHouse 18.16 and current releases alike (no Map, no JSON, no LowCardinality)."""
    return f"""CREATE TABLE IF NOT EXISTS {_name(database)}.{_name(table)} (
    received_at DateTime('UTC'),
    message_id String,
    command_type String,
    outcome String,
    reason String,
    error String,
    attempt UInt32,
    duration_ms Float64,
    broker String,
    attributes_keys Array(String),
    attributes_values Array(String),
    body String
) ENGINE = MergeTree() PARTITION BY toYYYYMM(received_at) ORDER BY (command_type, received_at)"""


def _backoff(failures: int) -> float:
    return min(_MAX_BACKOFF, _FIRST_BACKOFF * 2.0 ** (failures - 1))


def _name(identifier: str) -> str:
    return "`" + identifier.replace("\\", "\\\\").replace("`", "\\`") + "`"


class EventLake:
    """Batches outcome rows into ClickHouse; see the module docstring for the outage behaviour.

    ``connect`` returns a new, unopened asynch connection; it is called again after any failure, so a
    restarted ClickHouse is picked up without restarting incidentd.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        database: str,
        table: str,
        broker: str,
        batch_size: int = 1000,
        flush_interval: float = 5.0,
        buffer_limit: int = 100_000,
        max_body_bytes: int = 65_536,
        timeout: float = 10.0,
        close_timeout: float = 10.0,
    ) -> None:
        if batch_size > buffer_limit:
            raise ValueError("batch_size must not exceed buffer_limit")
        self._connect = connect
        self._ddl = create_table_sql(database, table)
        self._insert_sql = f"INSERT INTO {_name(database)}.{_name(table)} ({', '.join(COLUMNS)}) VALUES"
        self._broker = broker
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._limit = buffer_limit
        self._max_body = max_body_bytes
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._buffer: deque[Row] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Connection | None = None
        self._table_ready = False
        self._failing = False
        self._drop_logged = False
        self._closing = False
        self._closed = False
        #: Rows dropped because the buffer was full (or ClickHouse was still down at shutdown).
        self.dropped = 0
        #: Rows ClickHouse confirmed.
        self.written = 0
        #: Failed insert attempts (each is retried while the rows stay in the buffer).
        self.flush_failures = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # --- the observer: synchronous, never blocks, never raises ------------------------------------------

    def record(self, message: Message, command_type: str, outcome: Outcome, duration_s: float) -> None:
        """Buffer one row for a finished delivery; drop the oldest buffered row if the buffer is full."""
        row = self._row(message, command_type, outcome, duration_s)
        if self._closed:
            self.dropped += 1
            return
        if len(self._buffer) >= self._limit:
            self._buffer.popleft()
            self._count_dropped(1)
        self._buffer.append(row)
        if len(self._buffer) >= self._batch_size and not self._failing:
            self._wake.set()

    def _row(self, message: Message, command_type: str, outcome: Outcome, duration_s: float) -> Row:
        keys = sorted(message.attributes)
        return (
            datetime.now(UTC) - timedelta(seconds=duration_s),
            message.message_id,
            command_type,
            outcome.disposition.value,
            outcome.reason,
            outcome.error,
            max(message.attempt, 0),
            duration_s * 1000.0,
            self._broker,
            keys,
            [message.attributes[k] for k in keys],
            message.body[: self._max_body].decode("utf-8", "replace"),
        )

    def _count_dropped(self, rows: int) -> None:
        if not self._drop_logged:  # once per outage; the counter carries the rest
            log.warning("event lake buffer full, dropping oldest rows", limit=self._limit)
            self._drop_logged = True
        self.dropped += rows

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background flusher. ClickHouse need not be reachable yet."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-lake-flusher")

    async def close(self) -> None:
        """Flush everything buffered (retrying until ``close_timeout``), then disconnect.

        Rows ClickHouse still cannot take by then are logged as lost and counted in ``dropped``.
        """
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        self._closing = True
        self._wake.set()
        if self._task is not None:
            # Let a running insert finish (its rows would otherwise be sent twice), within the deadline.
            done, _ = await asyncio.wait({self._task}, timeout=self._close_timeout)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._final_flush(deadline)
        self._closed = True
        await self._disconnect()

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            delay = _backoff(failures) if failures else self._flush_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.flush()
            except Exception as exc:  # any failure of an analytics write is retried, never fatal
                failures += 1
                log.warning(
                    "event lake flush failed; rows stay buffered",
                    error=repr(exc),
                    buffered=len(self._buffer),
                    retry_in=_backoff(failures),
                )
            else:
                if failures:
                    log.info("event lake flushing again", written=self.written, dropped=self.dropped)
                failures = 0

    async def _final_flush(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        pause = 0.1
        while self._buffer and (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    await self.flush()
            except Exception as exc:
                log.warning("event lake flush at shutdown failed", error=repr(exc), buffered=self.buffered)
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
                pause = min(pause * 2, 2.0)
        if self._buffer:
            log.error("event lake rows lost at shutdown: ClickHouse unreachable", rows=len(self._buffer))
            self.dropped += len(self._buffer)
            self._buffer.clear()

    # --- writing ---------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Insert everything buffered, a batch at a time. On failure the batch goes back to the front."""
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
            try:
                await self._insert(batch)
            except BaseException:
                self._requeue(batch)
                self._failing = True
                self.flush_failures += 1
                raise
            self.written += len(batch)
            self._failing = self._drop_logged = False

    def _requeue(self, batch: Sequence[Row]) -> None:
        self._buffer.extendleft(reversed(batch))
        excess = len(self._buffer) - self._limit
        if excess > 0:
            for _ in range(excess):
                self._buffer.popleft()
            self._count_dropped(excess)

    async def _insert(self, rows: list[Row]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                async with conn.cursor() as cursor:
                    if not self._table_ready:
                        await cursor.execute(self._ddl)
                        self._table_ready = True
                    await cursor.execute(self._insert_sql, rows)
        except BaseException:
            # The connection's state is unknown after any error; the table may have been dropped.
            await self._disconnect()
            raise

    async def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._connect()
            await conn.connect()
            self._conn = conn
        return self._conn

    async def _disconnect(self) -> None:
        conn, self._conn, self._table_ready = self._conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.close()


def from_settings(settings: Settings) -> EventLake:
    """The event lake as configured; asynch is imported here, only when the lake is enabled."""
    from asynch import Connection

    from infra.secrets import read_secret

    password = read_secret(settings.clickhouse_password, settings.clickhouse_password_file)

    def connect() -> Connection:
        return Connection(
            host=settings.clickhouse_host,
            port=settings.clickhouse_port,
            database=settings.clickhouse_database,
            user=settings.clickhouse_user,
            password=password,
            connect_timeout=settings.clickhouse_timeout,
            send_receive_timeout=settings.clickhouse_timeout,
        )

    return EventLake(
        connect,
        database=settings.clickhouse_database,
        table=settings.clickhouse_table,
        broker=settings.broker,
        batch_size=settings.clickhouse_batch_size,
        flush_interval=settings.clickhouse_flush_interval,
        buffer_limit=settings.clickhouse_buffer_limit,
        max_body_bytes=settings.clickhouse_max_body_bytes,
        timeout=settings.clickhouse_timeout,
        close_timeout=settings.clickhouse_close_timeout,
    )


@contextlib.asynccontextmanager
async def open_event_lake(settings: Settings) -> AsyncIterator[EventLake]:
    """The event lake, started (writing in the background); closed after the worker has drained, so that
    the last outcomes are flushed to ClickHouse."""
    lake = from_settings(settings)
    await lake.start()
    async with closing(lake):
        yield lake
