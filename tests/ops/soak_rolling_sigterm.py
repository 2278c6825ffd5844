"""Repeated rolling SIGTERMs under a stream: how many messages were settled twice, how many dead letters
landed twice. A script, not a test (it prints numbers; docs/operations.md has the results):

    python tests/ops/soak_rolling_sigterm.py --broker rabbitmq --runs 20
    python tests/ops/soak_rolling_sigterm.py --broker pubsub --runs 3    # starts the emulator

Each run: a fresh topology and PostgreSQL schema (``app.py setup``), two ``app.py worker`` processes,
MESSAGES messages published at RATE per second (POISON of them undecodable, so each must become exactly
one dead letter), and SIGTERMS rolling replacements while they flow (start a new pod, wait for its
``/readyz``, SIGTERM the oldest - with deliveries in flight and buffered acks). When every valid message
is processed and every poison one dead-lettered, the last pods are stopped too.

Per run it prints: messages settled more than once (a message id with more than one ``message.acked`` /
``message.dead_lettered`` / ``message.duplicate_dropped`` line over all pods: a settle the broker lost,
so the message came back - a no-op in the store thanks to the idempotency record, and, when it was
not dropped as a copy of a settled message, a duplicate notification for side effects), dead-letter
copies of one message id beyond the first, pods that exited non-zero, and the slowest drain.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from application.messages import TYPE_ATTR  # noqa: E402
from config.settings import load  # noqa: E402
from tests.incidents.conftest import PG_DSN, drop_schema, payload  # noqa: E402
from tests.ops.test_rolling_restart import (  # noqa: E402
    NO_EXTRA_KEYS,
    VARIANTS,
    Pods,
    broker_of,
    pod_settings,
    setup_job,
)
from tests.workers import log_events  # noqa: E402

MESSAGES = 4000
POISON = 40
RATE = 200.0  # messages per second
SIGTERMS = 6


def bodies() -> list[tuple[bytes, bool]]:
    """MESSAGES bodies: Alertmanager webhooks of one alert each, every 100th one undecodable."""
    template = payload("alertmanager_firing")
    out = []
    every = MESSAGES // POISON
    for n in range(MESSAGES):
        if n % every == every - 1:
            out.append((b'{"not": "an alertmanager webhook"', True))
            continue
        alert = dict(template["alerts"][0]) | {"fingerprint": f"soak{n:08d}"}
        alert["labels"] = {"alertname": "Soak", "job": f"svc-{n % 8}", "env": "test", "instance": f"i-{n}"}
        out.append((json.dumps(template | {"alerts": [alert]}).encode(), False))
    return out


async def publish_stream(broker: Any, items: list[tuple[bytes, bool]], ids: dict[str, bool]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n, (body, poison) in enumerate(items):
        message_id = await broker.publisher.publish(body, {TYPE_ATTR: "alertmanager.webhook"})
        ids[message_id] = poison
        await asyncio.sleep(max(0.0, started + (n + 1) / RATE - loop.time()))


async def processed(schema: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        return int(await conn.fetchval(NO_EXTRA_KEYS.format("SELECT count(*) FROM processed_messages")))
    finally:
        await conn.close()


async def one_run(broker_name: str, directory: Path) -> dict[str, Any]:
    variant = VARIANTS[broker_name]()
    schema = "soak_" + uuid.uuid4().hex[:10]
    settings = pod_settings(variant.topology(), schema, PG_DSN) | {"log_level": "info"}
    loaded = load(**settings)
    items = bodies()
    ids: dict[str, bool] = {}
    try:
        await setup_job(settings)
        async with broker_of(loaded) as broker:
            with contextlib.ExitStack() as stack:
                pods = Pods(settings, directory, stack)
                live = [pods.start("p0"), pods.start("p1")]
                await asyncio.gather(*(pod.ready() for pod in live))
                publishing = asyncio.create_task(publish_stream(broker, items, ids))
                interval = (MESSAGES / RATE) / (SIGTERMS + 1)
                for i in range(SIGTERMS):
                    await asyncio.sleep(interval)
                    new = pods.start(f"p{i + 2}")
                    await new.ready()
                    await live[0].busy(at_least=1, timeout=2)
                    live.pop(0).sigterm()
                    live.append(new)
                await publishing
                valid = sum(1 for poison in ids.values() if not poison)
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    letters = await broker.dead_letters.list()
                    if await processed(schema) >= valid and len({x.message_id for x in letters}) >= POISON:
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(1.0)  # room for a late duplicate
                for pod in live:
                    pod.sigterm()
                exits = [await pod.exited() for pod in pods.all.values()]
            letters = await broker.dead_letters.list()
    finally:
        await variant.delete(loaded)
        await drop_schema(schema)
    settles: collections.Counter[str] = collections.Counter()
    drains = []
    for pod in pods.all.values():
        for event in ("message.acked", "message.dead_lettered", "message.duplicate_dropped"):
            settles.update(e["message_id"] for e in log_events(pod.log, event))
        drains += [e["drain_seconds"] for e in log_events(pod.log, "worker.stopped")]
    copies = collections.Counter(letter.message_id for letter in letters)  # listed once per id now:
    copies.update({letter.message_id: letter.copies - 1 for letter in letters})  # count the copies
    return {
        "published": len(ids),
        "settled_twice": sum(1 for n in settles.values() if n > 1),
        "unsettled": sum(1 for m in ids if settles[m] == 0),
        "dead_letters": sum(copies.values()),
        "duplicate_dead_letters": sum(n - 1 for n in copies.values()),
        "bad_exits": sum(1 for code in exits if code != 0),
        "max_drain_s": max(drains, default=0.0),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=sorted(VARIANTS), default="rabbitmq")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.broker == "pubsub" and "PUBSUB_EMULATOR_HOST" not in os.environ:
            from tests.pubsub import emulator

            script = emulator.launcher()
            assert script is not None, "the Pub/Sub emulator is not installed"
            os.environ["PUBSUB_EMULATOR_HOST"] = stack.enter_context(emulator.running(script))
        totals: collections.Counter[str] = collections.Counter()
        for run in range(1, args.runs + 1):
            with tempfile.TemporaryDirectory() as directory:
                try:
                    result = await one_run(args.broker, Path(directory))
                except Exception as exc:  # e.g. another test restarted RabbitMQ: not a result
                    print(f"run {run}/{args.runs} {args.broker}: not counted, {exc!r}"[:300], flush=True)
                    totals["not_counted"] += 1
                    continue
            totals.update({k: v for k, v in result.items() if k != "max_drain_s"})
            print(f"run {run}/{args.runs} {args.broker}: " + " ".join(f"{k}={v}" for k, v in result.items()),
                  flush=True)  # fmt: skip
        print(f"total over {args.runs} runs: " + " ".join(f"{k}={v}" for k, v in totals.items()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
