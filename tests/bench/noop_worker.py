"""What both broker benchmarks' B side shares: the incidentd worker path with a no-op command handler,
and a child process's own peak RSS.

Imported by the benchmark child processes only (``tests/bench`` is not collected by pytest).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any

TYPE = "bench.noop"
DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - the B side's log stream, for the life of the process


def noop_dispatcher(concurrency: int, log_level: str, on_outcome: Callable[..., None]) -> Any:
    """A Dispatcher for ``bench.noop`` commands (a pydantic model, decoded like any command) whose
    handler does nothing; logging configured as a worker's, to /dev/null. ``on_outcome`` observes every
    settled delivery. Imports the whole CLI first, so the process carries a real worker's footprint."""
    import app  # noqa: F401  - the worker's whole import footprint, for an honest RSS
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
