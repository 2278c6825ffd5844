"""The fuzz scenario both brokers' worker-process tests run: adversarial bodies (``tests/fuzz.py``) and
hostile broker metadata, then valid events for the same dedup keys after them, each message with an id
of its own; the worker's log, its SQLite store and the dead-letter destination show what became of each.

A broker test publishes ``fuzzed()`` and its own hostile-metadata messages, then ``CREATES``, waits
for them, then ``FOLLOW_UPS`` (resolve / acknowledge: they need their incident), and checks
``outcomes``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from application.commands import CreateIncident
from application.messages import TYPE_ATTR
from application.ports import DeadLetter
from tests import fuzz
from tests.conftest import fixture_json
from tests.contract.broker_contract import eventually
from tests.workers import sigterm

FUZZED = 300
# The same dedup keys the fuzzed fixtures carry (mutated ones may have stored odd incidents under them).
CREATES: list[tuple[str, bytes, dict[str, str]]] = [
    (f"valid-{name}", json.dumps(fixture_json(name)).encode(), {TYPE_ATTR: fuzz.TYPES[name]})
    for name in ("alertmanager_firing", "oec_create", "aws_health", "aws_securityhub")
] + [
    (f"valid-create-{i}", CreateIncident(title=f"disk full {i}", dedup_key=key).model_dump_json().encode(),
     {TYPE_ATTR: CreateIncident.TYPE})
    for i, key in enumerate(["", "fuzz", "x" * 200, "poison-0", *(f"fuzz-{i}" for i in range(10))])
]  # fmt: skip
FOLLOW_UPS: list[tuple[str, bytes, dict[str, str]]] = [
    (f"valid-{name}", json.dumps(fixture_json(name)).encode(), {TYPE_ATTR: fuzz.TYPES[name]})
    for name in ("alertmanager_resolved", "oec_acknowledge")
]
VALID = [message_id for message_id, _, _ in CREATES + FOLLOW_UPS]


def fuzzed() -> list[tuple[str, bytes, dict[str, object]]]:
    """``FUZZED`` adversarial messages (the known poisons first), each with its message id."""
    messages = itertools.islice(fuzz.messages(FUZZED), FUZZED)
    return [(f"fuzz-{i}", body, dict(attributes)) for i, (body, attributes) in enumerate(messages)]


Outgoing = list[tuple[str, bytes, dict[str, object]]]


async def run(
    worker: contextlib.AbstractContextManager[subprocess.Popen[bytes]],
    publish: Callable[[Outgoing], Awaitable[None]],
    hostile: Outgoing,
    db: Path,
    log: Path,
) -> list[str]:
    """Publish the fuzzed messages, ``hostile`` and ``CREATES``; start the worker; once the creates are
    stored publish ``FOLLOW_UPS``; wait for an outcome of every message, then SIGTERM: exit 0. Returns
    the message ids published."""
    first: Outgoing = [*fuzzed(), *hostile, *((i, b, dict(a)) for i, b, a in CREATES)]
    ids = [i for i, _, _ in first] + [i for i, _, _ in FOLLOW_UPS]
    await publish(first)
    with worker as process:
        await eventually(lambda: {i for i, _, _ in CREATES} <= processed(db), timeout=120)
        await publish([(i, b, dict(a)) for i, b, a in FOLLOW_UPS])
        await all_settled(ids, log)
        assert process.poll() is None, tail(log)
        assert await sigterm(process) == 0, tail(log)
    return ids


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def processed(db: Path) -> set[str]:
    """Idempotency keys (message ids) the worker stored an effect for."""
    if not db.exists():
        return set()
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return {key for (key,) in conn.execute("SELECT key FROM processed_messages")}
        except sqlite3.OperationalError:  # schema not created yet, or busy
            return set()


TERMINAL = ("message.acked", "message.dead_lettered")


def log_lines(log: Path) -> list[dict[str, object]]:
    """Every line of the worker's output as a JSON object (an AssertionError names the first that is
    not one)."""
    lines = []
    for number, line in enumerate(log.read_bytes().splitlines(), 1):
        try:
            doc = json.loads(line)
        except ValueError:
            raise AssertionError(
                f"line {number} of the worker's output is not JSON: {line[:300]!r}"
            ) from None
        assert isinstance(doc, dict), f"line {number} is JSON but not an object: {line[:300]!r}"
        lines.append(doc)
    return lines


def settled(log: Path) -> Counter[str]:
    """How many terminal outcomes (acked / dead-lettered) the worker logged per message id."""
    counts: Counter[str] = Counter()
    for line in log.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("event") in TERMINAL:
                counts[str(doc.get("message_id"))] += 1
    return counts


async def all_settled(ids: Iterable[str], log: Path, timeout: float = 120) -> None:
    """Wait until the worker logged an outcome for every message in ``ids``; name the missing ones if
    it does not within ``timeout`` seconds."""
    ids = set(ids)
    try:
        await eventually(lambda: ids <= set(settled(log)), timeout=timeout)
    except AssertionError:
        missing = sorted(ids - set(settled(log)))
        raise AssertionError(
            f"{len(missing)} messages without an outcome after {timeout}s: {missing[:20]}"
        ) from None


@dataclass
class Report:
    """What became of the published messages."""

    effects: set[str] = field(default_factory=set)
    dead: dict[str, DeadLetter] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.effects)} stored effects, {len(self.dead)} dead letters"


def outcomes(ids: Iterable[str], db: Path, log: Path, letters: list[DeadLetter]) -> Report:
    """Asserts every message in ``ids`` ended as exactly one stored effect or one dead letter (one copy,
    a non-empty reason), that the worker logged exactly one terminal outcome for each, that every log
    line is one JSON object, and that every valid message has its effect."""
    ids = list(ids)
    lines = log_lines(log)
    terminal = Counter(str(doc.get("message_id")) for doc in lines if doc.get("event") in TERMINAL)
    crashed = [
        doc for doc in lines if doc.get("level") in ("error", "critical") and doc.get("event") not in TERMINAL
    ]
    assert crashed == [], crashed[:3]
    effects = processed(db) & set(ids)
    by_id = {letter.message_id: letter for letter in letters}
    assert len(by_id) == len(letters), "two dlq entries for one message id"
    report = Report(effects, {i: by_id[i] for i in ids if i in by_id})
    assert set(by_id) <= set(ids), f"dead letters of unknown ids: {sorted(set(by_id) - set(ids))[:5]}"
    twice = {i: letter.copies for i, letter in report.dead.items() if letter.copies != 1}
    assert twice == {}, f"dead-lettered more than once: {twice}"
    no_reason = [i for i, letter in report.dead.items() if not letter.reason.strip()]
    assert no_reason == [], f"dead letters without a reason: {no_reason}"
    both = effects & set(report.dead)
    assert both == set(), f"stored and dead-lettered: {sorted(both)[:5]}"
    neither = [i for i in ids if i not in effects and i not in report.dead]
    assert neither == [], f"neither stored nor dead-lettered: {neither[:10]}"
    wrong = {i: terminal[i] for i in ids if terminal[i] != 1}
    assert wrong == {}, f"message ids without exactly one logged outcome: {dict(list(wrong.items())[:10])}"
    harmed = {i: report.dead[i].reason for i in VALID if i in report.dead}
    assert harmed == {}, f"valid messages dead-lettered: {harmed}"
    return report
