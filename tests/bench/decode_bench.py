"""Micro-benchmark of the per-message CPU the ingest and the worker share: ``CommandFactory.decode`` of the
real fixture payloads, and building the AMQP message the publisher sends.

    python tests/bench/decode_bench.py [-n 2000]
    python -m cProfile -s tottime tests/bench/decode_bench.py -n 2000 | head -40
    valgrind --tool=callgrind python tests/bench/decode_bench.py -n 200   # instructions, noise-free

Prints µs per operation (best of ``--repeat`` runs: the machine is shared, the minimum is the least noisy).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from application.commands import (
    AlertmanagerWebhook,
    AwsEvent,
    Command,
    CreateIncident,
    OpsgenieAction,
)
from application.factory import CommandFactory
from application.messages import TYPE_ATTR, Message
from infra.rabbitmq.message import new_message

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = {
    "alertmanager_firing": ("alertmanager_firing.json", AlertmanagerWebhook.TYPE),
    "alertmanager_resolved": ("alertmanager_resolved.json", AlertmanagerWebhook.TYPE),
    "oec_create": ("oec_create.json", OpsgenieAction.TYPE),
    "aws_health": ("aws_health.json", AwsEvent.TYPE),
    "aws_securityhub": ("aws_securityhub.json", AwsEvent.TYPE),
}
CREATE = b'{"title": "disk full on db-1", "service": "orders", "severity": "high", "dedup_key": "db-1-disk"}'


def per_op(fn: Callable[[], object], n: int, repeat: int) -> float:
    """µs per call of ``fn``: the best of ``repeat`` runs of ``n`` calls."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    commands: list[type[Command]] = [AlertmanagerWebhook, AwsEvent, CreateIncident, OpsgenieAction]
    factory = CommandFactory(commands)
    now = datetime.now(UTC)
    messages: dict[str, Message] = {}
    for name, (file, type_name) in CASES.items():
        body = (FIXTURES / file).read_bytes()
        messages[f"decode {name}"] = Message(body, {TYPE_ATTR: type_name}, publish_time=now)
        messages[f"decode {name} (no type)"] = Message(body, {}, publish_time=now)
    messages["decode incident.create"] = Message(CREATE, {TYPE_ATTR: CreateIncident.TYPE}, publish_time=now)
    for label, message in messages.items():
        factory.decode(message)  # every fixture decodes: a benchmark of the error path would mislead
        print(f"{label:42} {per_op(lambda m=message: factory.decode(m), args.n, args.repeat):8.1f} µs")
    body = (FIXTURES / "alertmanager_firing.json").read_bytes()
    attributes = {TYPE_ATTR: AlertmanagerWebhook.TYPE, "x-incidentd-sender": "alertmanager"}
    build = per_op(lambda: new_message(body, attributes, "http-0123456789abcdef"), args.n, args.repeat)
    print(f"{'build AMQP message (new_message)':42} {build:8.1f} µs")


if __name__ == "__main__":
    main()
