"""Retrieval quality, measured without a model: recall@k of the runbook index on labelled incidents.

    python -m tests.ai.recall            # recall@1 and recall@3, and every miss

Each line of tests/fixtures/ai_incidents.jsonl is a real-shaped payload (Alertmanager, OEC, AWS Health,
Security Hub) and the runbook (tests/fixtures/runbooks/) that answers it. The payload goes through the real
handlers into a scratch SQLite store; the incident it opens is turned into the query the analysis uses
(application.analysis.retrieval_query) and searched with the index the worker uses (infra.ai.knowledge).
A hit at k: a passage of the labelled runbook is among the top k passages (k = 3 is what the prompt gets).

``--plain`` drops identifiers from the queries (CamelCase alert names, upper-case event codes, control ids
such as ``EC2.13``), which the runbooks also name: it measures how far the words alone carry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from application.analysis import retrieval_query
from application.commands import Command
from application.dispatcher import Context, bind
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.incidents import IncidentPolicy
from application.messages import TYPE_ATTR, Message
from infra.ai.knowledge import RunbookIndex
from infra.sqlite.store import SqliteStore
from tests.standins.noop_actions import adapters_off

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RUNBOOKS = FIXTURES / "runbooks"
INCIDENTS = FIXTURES / "ai_incidents.jsonl"


@dataclass(frozen=True)
class Ranked:
    title: str
    expected: str
    found: tuple[str, ...]  # the runbooks of the passages, best first

    def hit(self, k: int) -> bool:
        return self.expected in self.found[:k]


_IDENTIFIER = re.compile(r"[A-Z][a-z]+(?:[A-Z][a-z0-9]+)+|[A-Z0-9]{2,}|[A-Z]{1,4}\d+")


def plain(query: str) -> str:
    return " ".join(w for w in query.split() if not _IDENTIFIER.fullmatch(w))


async def rank_all(k: int = 3, *, words_only: bool = False) -> list[Ranked]:
    factory = CommandFactory(HANDLERS)
    index = RunbookIndex(RUNBOOKS)
    ranked: list[Ranked] = []
    with tempfile.TemporaryDirectory() as scratch:
        store = await SqliteStore.open(Path(scratch) / "recall.db")
        try:
            handlers = bind(HANDLERS, {"store": store, "policy": IncidentPolicy(), **adapters_off()})
            for n, line in enumerate(INCIDENTS.read_text().splitlines()):
                case = json.loads(line)
                message = Message(json.dumps(case["data"]).encode(), {TYPE_ATTR: case["type"]}, f"recall-{n}")
                command: Command = factory.decode(message)
                before = {i.id for i in await store.list()}
                ctx = Context(message.message_id, message.idempotency_key, 1)
                for handler in handlers[type(command)]:
                    await handler(command, ctx)
                for incident in [i for i in await store.list() if i.id not in before]:
                    query = retrieval_query(incident)
                    passages = await index.search(plain(query) if words_only else query, k)
                    found = tuple(p.source for p in passages)
                    ranked.append(Ranked(incident.title, case["runbook"], found))
        finally:
            await store.close()
    return ranked


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--plain", action="store_true", help="queries without identifiers (alert names, codes)"
    )
    args = parser.parse_args()
    ranked = asyncio.run(rank_all(words_only=args.plain))
    runbooks = len(list(RUNBOOKS.glob("*.md")))
    print(f"{len(ranked)} labelled incidents, {runbooks} runbooks")
    for k in (1, 3):
        hits = sum(r.hit(k) for r in ranked)
        print(f"recall@{k}: {hits / len(ranked):.3f} ({hits}/{len(ranked)})")
    for r in ranked:
        if not r.hit(3):
            print(f"  miss: {r.title!r}: expected {r.expected}, got {list(r.found)}")


if __name__ == "__main__":
    main()
