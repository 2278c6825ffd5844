"""Dead letters are idempotent by message id: ``dlq list`` shows one entry per original message and
``dlq replay`` publishes each original once, however many copies landed.

A copy lands twice when a worker dies (SIGKILL, OOM) after its dead-letter copy was confirmed and before
the original's ack reached the broker: the original comes back, fails the same way, and is dead-lettered
again. The broker cannot tell the copies apart; their message id can.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TypeVar

from application.ports import DeadLetter

T = TypeVar("T")


def by_original(items: Iterable[T], letter_of: Callable[[T], DeadLetter]) -> list[list[T]]:
    """``items`` grouped by their dead letter's message id, in the order of each group's first item; an
    item without a message id is a group of its own."""
    groups: dict[str, list[T]] = {}
    for n, item in enumerate(items):
        groups.setdefault(letter_of(item).message_id or f"\0{n}", []).append(item)
    return list(groups.values())


def listed(group: list[T], letter_of: Callable[[T], DeadLetter]) -> DeadLetter:
    """The entry ``dlq list`` shows for one original: its oldest copy, with the number of copies."""
    return dataclasses.replace(letter_of(group[0]), copies=len(group))
