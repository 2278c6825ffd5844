"""Pub/Sub consumer benchmark on the emulator: (A) plain google-cloud-pubsub vs (B) the incidentd worker.

    python tests/bench/pubsub_bench.py [--messages 20000] [--rounds 3]

Starts the emulator (tests/pubsub/emulator.py) on a free port and alternates A B A B A B. Before each
run the parent creates a fresh topic and subscription and fills it with N JSON messages of about 300
bytes; the run itself is a subprocess that only consumes, so its CPU time (all its threads, the client's
included) and peak RSS are its own. Both sides allow 1000 outstanding messages.

(A) ``SubscriberClient.subscribe`` with ``FlowControl(max_messages=1000)`` and a callback doing
    ``json.loads`` and ``message.ack()`` (the client's default thread-pool scheduler).
(B) ``PubSubSubscriber`` + ``Dispatcher`` + ``run_worker`` (loop scheduler, factory decode into a pydantic
    command, semaphore, timeout, outcome log call) with a no-op handler; concurrency 500, so the derived
    flow control is 1000 messages. The process imports ``app`` (the CLI) first, so its RSS is a real
    worker's. Log level ``warning`` (the per-message ``message.acked`` line is filtered).

Prints msgs/s (median), CPU seconds per 10k messages (median), peak RSS (max), and B/A.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PROJECT = "incidentd-bench"
MAX_MESSAGES = 1000

from tests.bench.noop_worker import TYPE, alternate, noop_dispatcher, report, run_child, summarise  # noqa: E402


def body(i: int) -> bytes:
    doc = {"seq": i, "service": "checkout", "severity": "high", "summary": "p99 latency above SLO " * 6}
    raw = json.dumps(doc).encode()
    return raw + b" " * max(0, 300 - len(raw))


def fill(name: str, count: int) -> None:
    from google.cloud import pubsub_v1

    from infra.pubsub.message import MESSAGE_ID_ATTR

    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=1000, max_latency=0.05)
    )
    topic = publisher.topic_path(PROJECT, name)
    publisher.create_topic(name=topic)
    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.create_subscription(
            name=subscriber.subscription_path(PROJECT, name), topic=topic, ack_deadline_seconds=60
        )
    futures = [
        publisher.publish(topic, body(i), type=TYPE, **{MESSAGE_ID_ATTR: str(i)}) for i in range(count)
    ]
    for future in futures:
        future.result(timeout=120)
    publisher.stop()


def drop(name: str) -> None:
    from google.cloud import pubsub_v1

    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.delete_subscription(subscription=subscriber.subscription_path(PROJECT, name))
    publisher = pubsub_v1.PublisherClient()
    publisher.delete_topic(topic=publisher.topic_path(PROJECT, name))


# --- the two sides (run in a subprocess each) -----------------------------------------------------------


def side_a(name: str, count: int) -> tuple[float, float]:
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    seen: set[str] = set()
    lock, done = threading.Lock(), threading.Event()

    def callback(message: pubsub_v1.subscriber.message.Message) -> None:
        json.loads(message.data)
        message.ack()
        with lock:
            seen.add(message.message_id)
            if len(seen) == count:
                done.set()

    started, cpu = time.perf_counter(), time.process_time()
    future = subscriber.subscribe(
        subscriber.subscription_path(PROJECT, name), callback,
        flow_control=pubsub_v1.types.FlowControl(max_messages=MAX_MESSAGES),
    )  # fmt: skip
    done.wait(600)
    result = time.perf_counter() - started, time.process_time() - cpu
    future.cancel()
    future.result(timeout=30)
    subscriber.close()
    return result


async def side_b(name: str, count: int, log_level: str) -> tuple[float, float]:
    from application.worker import run_worker
    from config.settings import load
    from infra.pubsub import open_broker

    stop = asyncio.Event()
    seen: set[str] = set()

    def observe(message: object, *_: object) -> None:
        seen.add(message.message_id)  # type: ignore[attr-defined]
        if len(seen) == count:
            stop.set()

    settings = load(
        broker="pubsub", pubsub_project=PROJECT, pubsub_topic=name, pubsub_subscription=name,
        concurrency=MAX_MESSAGES // 2,
    )  # fmt: skip
    dispatcher = noop_dispatcher(MAX_MESSAGES // 2, log_level, observe)
    async with open_broker(settings) as broker:
        started, cpu = time.perf_counter(), time.process_time()
        worker = asyncio.create_task(
            run_worker(broker.subscriber, dispatcher, stop=stop, shutdown_timeout=10)
        )
        await stop.wait()
        result = time.perf_counter() - started, time.process_time() - cpu
        await worker
        return result


def child(side: str, name: str, count: int, log_level: str) -> None:
    """Consume; CPU and wall time cover the consumption only (not imports or connecting)."""
    if side == "A":
        seconds, cpu = side_a(name, count)
    else:
        seconds, cpu = asyncio.run(side_b(name, count, log_level))
    report(seconds, cpu, count)


# --- the parent -----------------------------------------------------------------------------------------


def run(side: str, count: int, log_level: str) -> dict[str, float]:
    name = f"incidentd-bench-{uuid.uuid4().hex[:8]}"
    fill(name, count)
    try:
        argv = [__file__, "--child", side, "--name", name, "--messages", str(count), "--log-level", log_level]
        return run_child(side, argv, timeout=900)
    finally:
        drop(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--child")
    parser.add_argument("--name")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.name, args.messages, args.log_level)
        return
    from tests.pubsub import emulator

    script = emulator.launcher()
    if script is None:
        sys.exit(f"no Pub/Sub emulator; install it with: {emulator.START_WITH}")
    with emulator.running(script) as host:
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        results = alternate(args.rounds, lambda side: run(side, args.messages, args.log_level))
    title = (
        f"{args.messages} messages x {args.rounds} rounds, {MAX_MESSAGES} outstanding, "
        f"B logs at {args.log_level}"
    )
    summarise(results, title, "A plain google-cloud-pubsub")


if __name__ == "__main__":
    main()
