"""Adversarial message bodies from a fixed seed: the real fixtures with hostile values in random places,
plus the known poisons (random bytes, invalid UTF-8, deep nesting, huge numbers, NaN, 5 MB, naive and
extreme times, wrong types)."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from typing import Any

from tests.conftest import fixture_json

FIXTURES = ("alertmanager_firing", "alertmanager_resolved", "oec_create", "oec_acknowledge", "aws_health",
            "aws_securityhub")  # fmt: skip
TYPES = {"alertmanager_firing": "alertmanager.webhook", "alertmanager_resolved": "alertmanager.webhook",
         "oec_create": "opsgenie.action", "oec_acknowledge": "opsgenie.action", "aws_health": "aws.event",
         "aws_securityhub": "aws.event"}  # fmt: skip

HOSTILE: list[Any] = [
    None, True, 0, -1, 1.5, 10**400, -(10**400), 2.5e20, -62135596800001, 253402300800000, "", "x" * 5000,
    "\x1b]8;;http://evil\x07click\x1b]8;;\x07\n\rforged row", [], {}, ["a", 1], {"a": {"b": [None]}},
    "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "2026-01-01T10:00:00", "1970-01-01T00:00:00Z",
    "not a time", "\ud800",
]  # fmt: skip


def _mutate(doc: Any, rng: random.Random) -> Any:
    """Replace one random node of ``doc`` (a dict / list tree) with a hostile value."""
    doc = copy.deepcopy(doc)
    parent, key, node = None, None, doc
    for _ in range(rng.randint(1, 6)):
        if isinstance(node, dict) and node:
            parent, key = node, rng.choice(list(node))
        elif isinstance(node, list) and node:
            parent, key = node, rng.randrange(len(node))
        else:
            break
        node = parent[key]
    if parent is None:
        return rng.choice(HOSTILE)
    parent[key] = rng.choice(HOSTILE)
    return doc


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def poisons() -> list[tuple[bytes, dict[str, str]]]:
    """The known poisons, each once: body and attributes."""
    am = fixture_json("alertmanager_firing")
    am["alerts"][0]["startsAt"] = "2026-01-01T10:00:00"
    aws = fixture_json("aws_health") | {"source": ["aws.health"]}
    aws_obj = fixture_json("aws_health") | {"source": {"x": 1}}
    oec = fixture_json("oec_acknowledge")
    oec["alert"]["updatedAt"] = 2.5e20
    return [
        (b"", {}),
        (bytes(range(256)), {}),
        (b"\xff\xfe{}", {"type": "incident.create"}),
        (nested(10_000), {}),
        (nested(10_000), {"type": "incident.create"}),
        (b"[" * 100_000, {}),
        (b'{"title": NaN, "at": NaN}', {"type": "incident.create"}),
        (b'{"title": "t", "severity": ' + b"9" * 400 + b"}", {"type": "incident.create"}),
        (json.dumps({"title": "x" * (5 * 1024 * 1024)}).encode(), {"type": "incident.create"}),
        (json.dumps({"title": "t", "at": "2026-01-01T10:00:00"}).encode(), {"type": "incident.create"}),
        (json.dumps({"title": "t", "at": "0001-01-01T00:00:00+14:00"}).encode(), {"type": "incident.create"}),
        (json.dumps(am).encode(), {}),
        (json.dumps(aws).encode(), {}),
        (json.dumps(aws_obj).encode(), {"type": "aws.event"}),
        (json.dumps(oec).encode(), {}),
        (json.dumps({"title": ["t"]}).encode(), {"type": "incident.create"}),
        (json.dumps({"title": "t"}).encode(), {"type": ["incident.create"]}),  # type: ignore[dict-item]
    ]


def messages(count: int, seed: int = 20261203) -> Iterator[tuple[bytes, dict[str, str]]]:
    """``count`` mutated fixtures (with and without a type attribute) after the known poisons."""
    yield from poisons()
    rng = random.Random(seed)
    for _ in range(count):
        name = rng.choice(FIXTURES)
        doc = _mutate(fixture_json(name), rng)
        try:
            body = json.dumps(doc).encode()
        except UnicodeEncodeError:
            body = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if rng.random() < 0.1:
            body = body[: rng.randrange(len(body) + 1)]
        yield body, ({"type": TYPES[name]} if rng.random() < 0.5 else {})
