"""End to end: a prefilled RabbitMQ queue of Alertmanager batches drained into PostgreSQL.

    python tests/bench/e2e_bench.py [--batches 2000] [--rounds 3] [--baseline DIR] [--baseline-env K=V,...]

``--baseline``: a third side, B0, runs ``app.py worker`` from another checkout (main, before a change) in
the same rounds; ``--baseline-env`` gives B0 settings of its own (``--baseline . --baseline-env
INCIDENTD_CONCURRENCY=16`` measures a setting). ``E2E_BENCH_PROFILE=/tmp/prof`` samples each worker with
py-spy (raw stacks, ``/tmp/prof.<round>``).

(A) the floor of the work: a minimal correct consumer written here - plain aio-pika, prefetch 128, an
    asyncpg pool of 10; per message one transaction that records the message id (``ON CONFLICT DO
    NOTHING``; a redelivery changes nothing) and upserts its 10 alerts by fingerprint in sorted order in
    one statement (occurrence count, status, the alert's JSON), then one ack per message.
(B) ``python app.py worker`` at its defaults (``INCIDENTD_BROKER=rabbitmq``, ``INCIDENTD_STORE=postgres``,
    JSON log lines at ``info`` on stderr, read by this parent), the ops server on a free port.

Alternates A B A B A B. Before each run the parent declares a fresh queue (incidentd's topology, quorum)
and fills it with ``--batches`` batches of 10 alerts (1,000 fingerprints over 20 services, ~10% resolved);
each side writes into a schema of its own, dropped afterwards. The clock starts when the consumer says it
is consuming and stops at its last settled message, so start-up (imports, migrations) is not counted.

Measured per run: alerts/s; per-message latency p50 / p99 (B: the ``duration_ms`` of its
``message.acked`` lines, from delivery to the ack, waiting for a slot included; A: the same span);
the consumer's CPU and its PostgreSQL backends' CPU (``/proc/PID/stat``; backends found by
``application_name``) per 1,000 alerts; its peak RSS (``VmHWM``); and, from ``pg_stat_activity`` sampled
every 20 ms, the backend-seconds spent waiting on locks (``wait_event_type = 'Lock'``: the advisory and
row locks) and idle outside a transaction (connections in the pool, not in use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
URL = os.environ.get("INCIDENTD_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_DSN = os.environ.get("INCIDENTD_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TYPE = "alertmanager.webhook"
PREFETCH = 128  # A: the worker's derived prefetch at its default concurrency (2 x 64)
POOL = 10  # A: the worker's default pool size
BASELINE = ""  # --baseline
BASELINE_ENV = ""  # --baseline-env
PROFILE = os.environ.get("E2E_BENCH_PROFILE", "")  # a file name prefix: py-spy raw profiles of B
SAMPLE = 0.02  # seconds between pg_stat_activity samples
T0 = datetime(2026, 11, 23, 10, tzinfo=UTC)
TICK = os.sysconf("SC_CLK_TCK")


def batches(count: int, seed: int = 7) -> list[bytes]:
    """Alertmanager webhook bodies, 10 alerts each, 1,000 fingerprints over 20 services."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        alerts = []
        for fingerprint in rng.sample(range(1000), 10):
            service = f"svc-{fingerprint % 20}"
            at = T0 + timedelta(seconds=n)
            resolved = rng.random() < 0.1
            alerts.append({
                "status": "resolved" if resolved else "firing",
                "labels": {"alertname": "HighLatency", "job": service, "env": "production",
                           "severity": "high", "instance": f"pod-{fingerprint}"},
                "annotations": {"summary": f"{service} latency high on pod-{fingerprint}",
                                "runbook_url": f"https://runbooks.example.com/{service}"},
                "startsAt": (at - timedelta(seconds=30)).isoformat(),
                "endsAt": at.isoformat() if resolved else "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph", "fingerprint": f"{fingerprint:016x}",
            })  # fmt: skip
        out.append(json.dumps({
            "version": "4", "groupKey": f"{{}}:{{alertname=\"HighLatency\",batch=\"{n}\"}}",
            "status": "firing", "receiver": "incidentd", "groupLabels": {"alertname": "HighLatency"},
            "commonLabels": {"alertname": "HighLatency", "env": "production"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": alerts,
        }).encode())  # fmt: skip
    return out


# --- queue and schema ---------------------------------------------------------------------------------


def topology(name: str) -> Any:
    from config.settings import load
    from infra.rabbitmq.topology import Topology

    return Topology.from_settings(load(rabbitmq_exchange=name, rabbitmq_queue=name))


async def fill(name: str, bodies: list[bytes]) -> None:
    import aio_pika

    from infra.rabbitmq.topology import declare

    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, topology(name))
        for start in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            body, headers={"type": TYPE}, message_id=f"m-{i}", content_type="application/json"
                        ),
                        routing_key=name,
                    )
                    for i, body in enumerate(bodies[start : start + 500], start)
                )
            )


async def drop(name: str, schema: str) -> None:
    import aio_pika
    import asyncpg

    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        t = topology(name)
        for queue in (t.queue, t.dlq, *t.retry_queues):
            await channel.queue_delete(queue)
        await channel.exchange_delete(t.exchange)
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# --- side A: the minimal correct consumer (a child process) -------------------------------------------

_A_SCHEMA = """
CREATE SCHEMA "{0}";
CREATE TABLE "{0}".processed (id text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE "{0}".alerts (fingerprint text PRIMARY KEY, service text NOT NULL, status text NOT NULL,
                           occurrences integer NOT NULL, last_seen timestamptz NOT NULL, doc jsonb NOT NULL);
"""
_A_PROCESSED = "INSERT INTO processed (id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true"
_A_UPSERT = """
INSERT INTO alerts (fingerprint, service, status, occurrences, last_seen, doc)
SELECT f, s, st, 1, now(), d::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS r(f, s, st, d)
ORDER BY f
ON CONFLICT (fingerprint) DO UPDATE SET status = EXCLUDED.status, last_seen = EXCLUDED.last_seen,
    occurrences = alerts.occurrences + 1, doc = EXCLUDED.doc
"""


async def side_a(name: str, schema: str, count: int, app_name: str) -> None:
    import aio_pika
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(_A_SCHEMA.format(schema))
    await conn.close()
    pool = await asyncpg.create_pool(
        PG_DSN, min_size=POOL, max_size=POOL,
        server_settings={"search_path": schema, "application_name": app_name},
    )  # fmt: skip
    latencies: list[float] = []
    done = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        alerts = sorted(json.loads(message.body)["alerts"], key=lambda a: a["fingerprint"])
        columns = (
            [a["fingerprint"] for a in alerts], [a["labels"]["job"] for a in alerts],
            [a["status"] for a in alerts], [json.dumps(a) for a in alerts],
        )  # fmt: skip
        async with pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(_A_PROCESSED, message.message_id):
                await conn.execute(_A_UPSERT, *columns)
        await message.ack()
        latencies.append(time.perf_counter() - started)
        if len(latencies) == count:
            done.set()

    connection = await aio_pika.connect_robust(URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(name, ensure=False)
        print("consuming", file=sys.stderr, flush=True)
        await queue.consume(on_message)
        await done.wait()
        print(json.dumps({"latencies_ms": [round(s * 1000, 3) for s in latencies]}), flush=True)
        # Parked, the pool's backends alive, until the parent has read their CPU and the peak RSS.
        await asyncio.Event().wait()


# --- the parent: one run of one side ------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """pg_stat_activity every ``SAMPLE`` seconds for the run's backends (by application_name): which
    backends exist (for their CPU), and how many wait on a lock or sit idle in the pool."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.pids: set[int] = set()
        self.lock_samples = 0
        self.idle_samples = 0
        self.samples = 0
        self.start_cpu: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sampler:
        import asyncpg

        self._conn = await asyncpg.connect(PG_DSN)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self._conn.close()

    async def backends(self) -> list[tuple[int, str | None, str | None]]:
        rows = await self._conn.fetch(
            "SELECT pid, state, wait_event_type FROM pg_stat_activity WHERE application_name = $1",
            self.app_name,
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def mark_start(self) -> None:
        for pid, _, _ in await self.backends():
            self.pids.add(pid)
            self.start_cpu[pid] = proc_cpu(pid)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE)
            rows = await self.backends()
            self.samples += 1
            for pid, state, wait in rows:
                self.pids.add(pid)
                self.lock_samples += wait == "Lock"
                self.idle_samples += state == "idle"

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def hot_share(self, schema: str, table: str) -> float:
        """The share of the table's row updates made in place (HOT: no index entry written), read once
        the consumer has exited (a backend reports its statistics when it ends)."""
        for _ in range(50):
            row = await self._conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE schemaname = $1 AND relname = $2", schema, table,
            )  # fmt: skip
            if row and row[0]:
                return float(row[1] / row[0])
            await asyncio.sleep(0.1)
        return 0.0

    def server_cpu(self) -> float:
        return sum(proc_cpu(pid) - self.start_cpu.get(pid, 0.0) for pid in self.pids)


async def run(side: str, bodies: list[bytes], round_: int) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    name, schema, app_name = f"e2e-bench-{tag}", f"e2e_bench_{tag}", f"e2e_bench_{side}_{tag}"
    await fill(name, bodies)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if side == "A":
        argv = [sys.executable, __file__, "--child", name, "--schema", schema, "--app-name", app_name,
                "--batches", str(len(bodies))]  # fmt: skip
    else:
        root = Path(BASELINE) if side == "B0" else ROOT
        argv = [sys.executable, str(root / "app.py"), "worker"]
        env.update(
            INCIDENTD_BROKER="rabbitmq", INCIDENTD_STORE="postgres", INCIDENTD_RABBITMQ_URL=URL,
            INCIDENTD_RABBITMQ_EXCHANGE=name, INCIDENTD_RABBITMQ_QUEUE=name,
            INCIDENTD_POSTGRES_DSN=f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}application_name={app_name}",
            INCIDENTD_POSTGRES_SCHEMA=schema, INCIDENTD_OPS_HOST="127.0.0.1", INCIDENTD_OPS_PORT="0",
            INCIDENTD_LOG_LEVEL="info", INCIDENTD_LOG_FORMAT="json",
        )  # fmt: skip
        if side == "B0":  # --baseline-env: settings that only B0 runs with (a lever, measured against B)
            env.update(item.partition("=")[::2] for item in BASELINE_ENV.split(",") if item)
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=ROOT if side == "A" else root, limit=1 << 24,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    latencies: list[float] = []
    tail: list[bytes] = []
    try:
        async with Sampler(app_name) as sampler:
            async with asyncio.timeout(900):
                while True:  # until the consumer is consuming
                    line = await proc.stderr.readline()
                    if not line:
                        raise RuntimeError(f"side {side} exited:\n{b''.join(tail).decode()[-3000:]}")
                    tail = [*tail[-29:], line]
                    if b"consuming" in line:
                        break
                if PROFILE and side != "A":  # sampled from outside for 20 s; its own CPU is not the worker's
                    profile = [
                        f"--pid={proc.pid}",
                        "-r",
                        "200",
                        "-d",
                        "20",
                        "-f",
                        "raw",
                        "-o",
                        f"{PROFILE}.{round_}",
                    ]
                    await asyncio.create_subprocess_exec(
                        "py-spy",
                        "record",
                        *profile,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                started, cpu0 = time.perf_counter(), proc_cpu(proc.pid)
                await sampler.mark_start()
                if side == "A":
                    drain = asyncio.get_running_loop().create_task(_drain(proc.stderr))
                    result = json.loads(await proc.stdout.readline())
                    drain.cancel()
                    latencies = result["latencies_ms"]
                else:
                    while len(latencies) < len(bodies):
                        line = await proc.stderr.readline()
                        if not line:
                            raise RuntimeError(f"worker exited:\n{b''.join(tail).decode()[-3000:]}")
                        tail = [*tail[-29:], line]
                        if b'"message.acked"' in line:
                            latencies.append(json.loads(line)["duration_ms"])
                        elif b'"level":"error"' in line or b'"message.retry"' in line:
                            raise RuntimeError(f"worker: {line.decode()}")
            elapsed = time.perf_counter() - started
            cpu = proc_cpu(proc.pid) - cpu0
            sampler.stop()
            server = sampler.server_cpu()
            rss = peak_rss_mb(proc.pid)
            drain = asyncio.get_running_loop().create_task(_drain(proc.stderr))
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)
            drain.cancel()
            samples = max(1, sampler.samples)
            lock_wait = sampler.lock_samples / samples * elapsed
            idle = sampler.idle_samples / samples * elapsed
            hot = await sampler.hot_share(schema, "alerts" if side == "A" else "incidents")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await drop(name, schema)
    alerts = 10 * len(bodies)
    q = statistics.quantiles(latencies, n=100)
    result = {
        "rate": alerts / elapsed, "p50": q[49], "p99": q[98], "cpu_per_1k": cpu / alerts * 1000,
        "server_per_1k": server / alerts * 1000, "rss": rss, "lock_wait": lock_wait, "idle": idle,
        "backends": len(sampler.pids), "seconds": elapsed, "hot": hot,
    }  # fmt: skip
    print(
        f"  round {round_} {side}: {result['rate']:7,.0f} alerts/s  "
        f"p50 {q[49]:6.1f} ms  p99 {q[98]:6.1f} ms  "
        f"CPU {result['cpu_per_1k']:.3f} + server {result['server_per_1k']:.3f} s/1k alerts  "
        f"{rss:.1f} MB  lock wait {lock_wait:.2f} s  idle in pool {idle:.2f} s "
        f"({len(sampler.pids)} backends, {hot:.0%} of row updates HOT)",
        flush=True,
    )
    return result


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def summarise(results: dict[str, list[dict[str, float]]], title: str) -> None:
    print(f"\n{title}")
    header = ("| side | alerts/s | p50 / p99 ms per message | worker CPU s / 1k alerts | PostgreSQL CPU s "
              "/ 1k alerts | peak RSS MB | lock wait backend-s | idle in pool backend-s |")  # fmt: skip
    print(header)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians: dict[str, dict[str, float]] = {}
    labels = [("A", "A minimal aio-pika + asyncpg"), ("B", "B `app.py worker` (defaults)")]
    labels += [("B0", "B0 `app.py worker`, baseline checkout")] if results.get("B0") else []
    for side, label in labels:
        runs = results[side]
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m["rss"] = max(r["rss"] for r in runs)
        medians[side] = m
        print(f"| {label} | {m['rate']:,.0f} | {m['p50']:.1f} / {m['p99']:.1f} | {m['cpu_per_1k']:.3f} "
              f"| {m['server_per_1k']:.3f} | {m['rss']:.1f} | {m['lock_wait']:.2f} "
              f"| {m['idle']:.2f} |")  # fmt: skip
    a, b = medians["A"], medians["B"]
    rounds = ", ".join(
        f"{rb['rate'] / ra['rate']:.2f}" for ra, rb in zip(results["A"], results["B"], strict=True)
    )
    if "B0" in medians:
        b0 = medians["B0"]
        print(f"\nB0/A = {b0['rate'] / a['rate']:.2f} alerts/s (baseline)", end="")
    print(
        f"\nB/A = {b['rate'] / a['rate']:.2f} alerts/s (median of rounds; per round: {rounds})"
        f", {b['cpu_per_1k'] / a['cpu_per_1k']:.2f} worker CPU, "
        f"{b['server_per_1k'] / max(a['server_per_1k'], 1e-9):.2f} server CPU"
    )


async def parent(args: argparse.Namespace) -> None:
    bodies = batches(args.batches)
    title = (
        f"{args.batches} batches x 10 alerts x {args.rounds} rounds, A B A B..., cpus {os.cpu_count()}, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    print(title, flush=True)
    global BASELINE, BASELINE_ENV
    BASELINE, BASELINE_ENV = args.baseline or "", args.baseline_env
    sides = [side for side in ("A", "B", "B0") if side in args.sides.split(",")]
    if BASELINE and "B0" not in sides:
        sides.append("B0")
    results: dict[str, list[dict[str, float]]] = {side: [] for side in ("A", "B", "B0")}
    for round_ in range(1, args.rounds + 1):
        for side in sides:
            results[side].append(await run(side, bodies, round_))
    if results["A"] and results["B"]:
        summarise(results, f"{title}, load average at end {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=2000, help="messages of 10 alerts per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default="A,B", help="A,B (default), or A or B alone")
    parser.add_argument(
        "--baseline", help="a checkout whose app.py worker also runs, as B0 (before a change)"
    )
    parser.add_argument("--baseline-env", default="", help="KEY=VALUE,... set for B0 only, e.g. a setting")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--app-name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(side_a(args.child, args.schema, args.batches, args.app_name))
        return
    asyncio.run(parent(args))


if __name__ == "__main__":
    main()
