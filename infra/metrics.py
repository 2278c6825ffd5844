"""The worker's Prometheus metrics, in a registry of its own.

A registry per :class:`Metrics` (not prometheus_client's global one) keeps tests isolated and lets the
ops server expose exactly what the worker records. The dispatcher reports every outcome through
:meth:`Metrics.observe`; it runs once per message, so it only looks up pre-bound label children.

Besides incidentd's own series the registry holds the process's (``process_resident_memory_bytes``,
``process_cpu_seconds_total``, open files, start time) and ``incidentd_build_info``. No ``*_created``
series are exported: Prometheus does not use them, and they doubled the series of every counter and
histogram.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from application.messages import Disposition, Message, Outcome

UNKNOWN_COMMAND = "unknown"
# Command types come from the factory's registry, but a bug feeding free text into the label would grow
# the series without bound; past this many distinct types, the rest are counted as "other".
MAX_COMMAND_TYPES = 200
OTHER_COMMAND = "other"

# Handlers call external APIs (Slack, GitHub, Kubernetes): most finish in tens of ms, slow ones in
# seconds, and the default command timeout is 30 s.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Observer = Callable[[Message, str, Outcome, float], None]


class Metrics:
    """Counters, histogram and gauges of one worker process.

    ``command_types`` (the factory's registered types) are bound up front, so every series exists at 0
    from the first scrape and ``rate()`` sees the first message of a type.
    """

    def __init__(self, registry: CollectorRegistry | None = None, command_types: Iterable[str] = ()) -> None:
        # A process-wide switch of prometheus_client, checked when samples are collected.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.received_messages = Counter(
            "incidentd_messages_received",
            "Messages received, by command type, counted before they run (unknown: not decodable).",
            ["command_type"],
            registry=self.registry,
        )
        self.messages = Counter(
            "incidentd_messages",
            "Messages handled, by command type and outcome (ack, retry, dead_letter).",
            ["command_type", "outcome"],
            registry=self.registry,
        )
        self.handler_duration = Histogram(
            "incidentd_handler_duration_seconds",
            "Time from dispatch to outcome, retries in-process included, by command type.",
            ["command_type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "incidentd_messages_in_flight",
            "Deliveries holding a concurrency slot (being handled or settled) right now.",
            registry=self.registry,
        )
        self.broker_reconnects = Counter(
            "incidentd_broker_reconnects",
            "Times the broker connection was lost and re-established.",
            registry=self.registry,
        )
        self.shutdown_drain = Gauge(
            "incidentd_shutdown_drain_seconds",
            "How long the last shutdown waited for in-flight messages (0 until a shutdown drains).",
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "incidentd_event_loop_lag_seconds",
            "How late the event loop ran the ops server's watchdog timer at its last tick.",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "incidentd_messages_waiting",
            "Deliveries received and waiting for a concurrency slot (not counted as in flight).",
            registry=self.registry,
        )
        self._settle_failures = _CallbackCounter(
            "incidentd_settle_failures",
            "Outcomes the broker did not take (connection lost): the broker redelivers those messages.",
        )
        self.registry.register(self._settle_failures)
        Info(
            "incidentd_build", "incidentd's version, and the Python running it.", registry=self.registry
        ).info({"version": _version(), "python": platform.python_version()})
        ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open fds, start time (Linux /proc)
        self._children: dict[tuple[str, Disposition], tuple[Counter, Histogram]] = {}
        self._received: dict[str, Counter] = {}
        self._command_types: set[str] = set()
        for command_type in (*command_types, UNKNOWN_COMMAND):
            self._bind_all(command_type)

    def received(self, message: Message, command_type: str) -> None:
        """Count one delivery as it arrives; the dispatcher calls this once its command type is known."""
        counter = self._received.get(command_type)
        if counter is None:
            counter = self._received[self._bind_type(command_type)]
        counter.inc()

    def observe(self, message: Message, command_type: str, outcome: Outcome, duration_s: float) -> None:
        """Record one outcome; the dispatcher calls this for every message it settles."""
        children = self._children.get((command_type, outcome.disposition))
        if children is None:
            children = self._bind_new(command_type, outcome.disposition)
        counter, histogram = children
        counter.inc()
        histogram.observe(duration_s)

    def track_in_flight(self, count: Callable[[], float]) -> None:
        """Read the in-flight gauge from ``count`` at every scrape (e.g. the dispatcher's task count)."""
        self.in_flight.set_function(count)

    def track_waiting(self, count: Callable[[], float]) -> None:
        """Read the waiting gauge from ``count`` at every scrape (the dispatcher's deliveries waiting for
        a slot)."""
        self.waiting.set_function(count)

    def track_settle_failures(self, count: Callable[[], float]) -> None:
        """Read the settle-failures counter from ``count`` (the dispatcher's own count) at every scrape."""
        self._settle_failures.read = count

    def reconnected(self) -> None:
        """A broker subscriber calls this each time it re-establishes a lost connection."""
        self.broker_reconnects.inc()

    def drained(self, seconds: float) -> None:
        """The worker calls this when a shutdown has finished waiting for in-flight messages."""
        self.shutdown_drain.set(seconds)

    def _bind_new(self, command_type: str, disposition: Disposition) -> tuple[Counter, Histogram]:
        return self._children[(self._bind_type(command_type), disposition)]

    def _bind_type(self, command_type: str) -> str:
        """Bind a new type's series (or "other", past the cap); the label actually used."""
        if command_type not in self._command_types and len(self._command_types) >= MAX_COMMAND_TYPES:
            command_type = OTHER_COMMAND
        self._bind_all(command_type)
        return command_type

    def _bind_all(self, command_type: str) -> None:
        self._command_types.add(command_type)
        self._received[command_type] = self.received_messages.labels(command_type=command_type)
        histogram = self.handler_duration.labels(command_type=command_type)
        for disposition in Disposition:
            counter = self.messages.labels(command_type=command_type, outcome=disposition.value)
            self._children[(command_type, disposition)] = (counter, histogram)


class _CallbackCounter(Collector):
    """A counter whose value another object keeps (the dispatcher counts its settle failures itself)."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self.read: Callable[[], float] = lambda: 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self.read())


def _version() -> str:
    try:
        return version("incidentd")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"
