"""RabbitMQ consumer benchmark: (A) plain aio-pika vs (B) the incidentd worker path.

    python tests/bench/rabbitmq_bench.py [--messages 50000] [--rounds 3] [--baseline CHECKOUT] [--callgrind]

``--baseline``: B0, the B side run from another checkout (before a change), alternates with A and B.
``--callgrind``: instead of seconds, the instructions each side executes per message while it consumes
(valgrind, switched on when the child says it is consuming): a figure the machine's load does not move.

Alternates A B A B A B. Before each run the parent fills a fresh quorum queue (declared by incidentd's
topology) with N JSON messages of about 300 bytes; the run itself is a subprocess that only consumes, so
its CPU time and peak RSS are its own. Both sides use prefetch 256.

(A) ``queue.consume`` with a callback doing ``json.loads`` and ``await message.ack()`` per message.
(B) ``RabbitSubscriber`` + ``Dispatcher`` + ``run_worker`` (coalesced acks, factory decode into a pydantic
    command, semaphore, timeout, outcome log call) with a no-op handler; concurrency 128, so the
    derived prefetch is 256. The process imports ``app`` (the CLI) first, so its RSS is a real worker's.
    Log level ``warning`` (the per-message ``message.acked`` line is filtered); ``--log-level info``
    measures with the line written (to /dev/null).

Prints msgs/s (median), CPU seconds per 10k messages (median), peak RSS (max), and B/A.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

# The code under test; B0 (--baseline) runs this script with BENCH_ROOT set to another checkout.
ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parents[2])
sys.path.insert(0, str(ROOT))
URL = os.environ.get("INCIDENTD_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
PREFETCH = 256
BASELINE = ""  # --baseline
CALLGRIND = False  # --callgrind

from tests.bench.noop_worker import TYPE, alternate, noop_dispatcher, report, run_child, summarise  # noqa: E402


def body(i: int) -> bytes:
    doc = {"seq": i, "service": "checkout", "severity": "high", "summary": "p99 latency above SLO " * 6}
    raw = json.dumps(doc).encode()
    return raw + b" " * max(0, 300 - len(raw))


async def fill(queue_name: str, count: int) -> None:
    import aio_pika

    from infra.rabbitmq.topology import Topology, declare

    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, Topology(queue_name, queue_name, "quorum", ()))
        for start in range(0, count, 1000):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body(i), headers={"type": TYPE}, message_id=str(i)),
                        routing_key=queue_name,
                    )
                    for i in range(start, min(count, start + 1000))
                )
            )


async def drop(queue_name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue_name)
        await channel.queue_delete(f"{queue_name}.dlq")
        await channel.exchange_delete(queue_name)


# --- the two sides (run in a subprocess each) -----------------------------------------------------------


async def side_a(queue_name: str, count: int) -> tuple[float, float]:
    import aio_pika

    connection = await aio_pika.connect_robust(URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(queue_name, ensure=False)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            json.loads(message.body)
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        started, cpu = time.perf_counter(), time.process_time()
        print("consuming", file=sys.stderr, flush=True)
        await queue.consume(on_message)
        await done.wait()
        return time.perf_counter() - started, time.process_time() - cpu


async def side_b(queue_name: str, count: int, log_level: str) -> tuple[float, float]:
    from application.worker import run_worker
    from config.settings import load
    from infra.rabbitmq import open_broker

    stop = asyncio.Event()
    seen = 0

    def observe(*_: object) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            stop.set()

    settings = load(
        rabbitmq_url=URL, rabbitmq_exchange=queue_name, rabbitmq_queue=queue_name, concurrency=128
    )
    dispatcher = noop_dispatcher(128, log_level, observe)
    async with open_broker(settings) as broker:
        started, cpu = time.perf_counter(), time.process_time()
        print("consuming", file=sys.stderr, flush=True)
        await run_worker(broker.subscriber, dispatcher, stop=stop, shutdown_timeout=10)
        return time.perf_counter() - started, time.process_time() - cpu


def child(side: str, queue_name: str, count: int, log_level: str) -> None:
    """Consume; CPU and wall time cover the consumption only (not imports or connecting)."""
    if side == "A":
        seconds, cpu = asyncio.run(side_a(queue_name, count))
    else:
        seconds, cpu = asyncio.run(side_b(queue_name, count, log_level))
    report(seconds, cpu, count)


# --- the parent -----------------------------------------------------------------------------------------


def instructions(argv: list[str]) -> int:
    """Instructions the child executes while it consumes (callgrind, switched on when the child says it
    is consuming): a count the machine's other load does not change, unlike seconds."""
    out = f"/tmp/rabbitmq-bench-callgrind.{uuid.uuid4().hex[:8]}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    proc = subprocess.Popen(
        [*valgrind, sys.executable, *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"consuming" in line:
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True, check=True)
            break
    proc.stderr.read()
    if proc.wait():
        sys.exit(f"callgrind run failed: {argv}")
    with open(out) as dump:
        total = next(int(line.split()[1]) for line in dump if line.startswith("summary:"))
    os.unlink(out)
    return total


def run(side: str, count: int, log_level: str) -> dict[str, float]:
    queue_name = f"incidentd-bench-{uuid.uuid4().hex[:8]}"
    asyncio.run(fill(queue_name, count))
    try:
        os.environ["BENCH_ROOT"] = BASELINE if side == "B0" else ""
        argv = [__file__, "--child", side[0], "--queue", queue_name, "--messages", str(count),
                "--log-level", log_level]  # fmt: skip
        if CALLGRIND:
            count_ = instructions(argv)
            print(f"  {side}: {count_ / count:,.0f} instructions per message", flush=True)
            return {"rate": 0.0, "cpu_per_10k": 0.0, "rss_mb": 0.0, "instructions": count_ / count}
        return run_child(side, argv, timeout=600)
    finally:
        asyncio.run(drop(queue_name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--baseline", help="a checkout whose B side also runs, as B0 (before a change)")
    parser.add_argument("--callgrind", action="store_true", help="instructions per message (slow; valgrind)")
    parser.add_argument("--child")
    parser.add_argument("--queue")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.queue, args.messages, args.log_level)
        return
    global BASELINE, CALLGRIND
    BASELINE, CALLGRIND = args.baseline or "", args.callgrind
    sides = ("A", "B", "B0") if BASELINE else ("A", "B")
    results = alternate(args.rounds, lambda side: run(side, args.messages, args.log_level), sides)
    title = (
        f"{args.messages} messages x {args.rounds} rounds, prefetch {PREFETCH}, B logs at {args.log_level}"
    )
    if CALLGRIND:
        per = {side: statistics.median(r["instructions"] for r in runs) for side, runs in results.items()}
        print(f"\n{title}: instructions per message (callgrind, median)")
        for side, n in per.items():
            print(f"  {side}: {n:,.0f}  ({n / per['A']:.2f} x A)")
        return
    summarise(results, title, "A plain aio-pika")


if __name__ == "__main__":
    main()
