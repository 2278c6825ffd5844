"""What both broker benchmarks share: the B side's incidentd worker path with a no-op command handler, a
child process's own peak RSS, and the parent's A B A B A B rounds and summary table.

Imported by the benchmark child processes only (``tests/bench`` is not collected by pytest).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

TYPE = "bench.noop"
DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - the B side's log stream, for the life of the process


def noop_dispatcher(concurrency: int, log_level: str, on_outcome: Callable[..., None]) -> Any:
    """A Dispatcher for ``bench.noop`` commands (a pydantic model, decoded like any command) whose
    handler does nothing; logging configured as a worker's, to /dev/null. ``on_outcome`` observes every
    settled delivery. Imports the worker's bootstrap first, so the process carries a worker's footprint."""
    import config.bootstrap  # noqa: F401  - the worker's whole import footprint, for an honest RSS
    from application.commands import Command
    from application.dispatcher import Context, Dispatcher, bind
    from application.factory import CommandFactory
    from common.logging import configure_logging

    class Noop(Command):
        TYPE = TYPE
        model_config = {"frozen": True, "extra": "allow"}
        seq: int

    async def noop(cmd: Noop, ctx: Context) -> None:
        return None

    configure_logging(level=log_level, stream=DEVNULL)
    return Dispatcher(
        CommandFactory([Noop]), bind({Noop: [noop]}, {}), concurrency=concurrency, timeout=10,
        observers=[on_outcome],
    )  # fmt: skip


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ``ru_maxrss``: Linux carries that across ``exec`` from the forking
    parent (which fills the queue); ``VmHWM`` belongs to the new address space."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(seconds: float, cpu: float, count: int) -> None:
    """The child's one line for the parent: rate, CPU per 10k messages, its own peak RSS."""
    print(json.dumps({"rate": count / seconds, "cpu_per_10k": cpu / count * 10_000, "rss_mb": peak_rss_mb()}))


def run_child(side: str, argv: list[str], timeout: float) -> dict[str, float]:
    """Run one side in a process of its own (``argv``: the script and its child arguments); print and
    return what it reported."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        sys.exit(f"side {side} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    rate, cpu, rss = result["rate"], result["cpu_per_10k"], result["rss_mb"]
    print(f"  {side}: {rate:8.0f} msg/s  {cpu:.2f} CPU s/10k  {rss:.1f} MB", flush=True)
    return result


def alternate(
    rounds: int, run: Callable[[str], dict[str, float]], sides: tuple[str, ...] = ("A", "B")
) -> dict[str, list[dict[str, float]]]:
    """A B A B ...: ``rounds`` runs of each side, alternating, so both see the same machine (``B0``, when
    asked for: B's code from another checkout, e.g. before a change)."""
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for round_ in range(1, rounds + 1):
        print(f"round {round_}", flush=True)
        for side in sides:
            results[side].append(run(side))
    return results


def summarise(results: dict[str, list[dict[str, float]]], title: str, label_a: str) -> None:
    """The table: msgs/s and CPU per 10k (medians), peak RSS (max), and B/A for each."""
    print(f"\n{title}")
    print("| side | msgs/s (median) | CPU s / 10k (median) | peak RSS MB (max) |")
    print("| --- | ---: | ---: | ---: |")
    medians: dict[str, tuple[float, float, float]] = {}
    labels = [("A", label_a), ("B", "B incidentd worker")] + [("B0", "B0 incidentd, baseline")] * (
        "B0" in results
    )
    for side, label in labels:
        rate = statistics.median(r["rate"] for r in results[side])
        cpu = statistics.median(r["cpu_per_10k"] for r in results[side])
        rss = max(r["rss_mb"] for r in results[side])
        medians[side] = (rate, cpu, rss)
        print(f"| {label} | {rate:,.0f} | {cpu:.2f} | {rss:.1f} |")
    (ra, ca, ma), (rb, cb, mb) = medians["A"], medians["B"]
    print(f"\nB/A = {rb / ra:.2f} msgs/s, {cb / ca:.2f} CPU, {mb / ma:.2f} RSS")
    per_round = ", ".join(
        f"{b['rate'] / a['rate']:.2f}" for a, b in zip(results["A"], results["B"], strict=True)
    )
    print(f"B/A msgs/s per round: {per_round}")
    if "B0" in medians:
        r0, c0, m0 = medians["B0"]
        print(f"B0/A = {r0 / ra:.2f} msgs/s, {c0 / ca:.2f} CPU, {m0 / ma:.2f} RSS (baseline)")
