"""``<subscription>.dlq``: list, replay and purge dead letters with synchronous pull.

A session pulls every message the dead-letter subscription has (holding each for its ack deadline),
sorts them oldest first (by the time they were dead-lettered), acts on the first ``limit``, and nacks
every message it did not ack at the end, so they show again at once: listing removes nothing, and a
replay or purge that fails half-way leaves what it did not finish where it was. Dead-letter
subscriptions are meant to stay small; a session holds them all in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from application.dead_letters import by_original, listed
from application.errors import BrokerOperationError
from application.messages import Message
from application.ports import DeadLetter, ReplayReport
from infra.pubsub import message as pubsub

if TYPE_CHECKING:
    from google.cloud.pubsub_v1 import SubscriberClient
    from google.pubsub_v1.types import ReceivedMessage

    from infra.pubsub.publisher import PubSubPublisher
    from infra.pubsub.topology import Topology

log = structlog.get_logger("incidentd.pubsub.dlq")

Pulled = list["ReceivedMessage"]  # (the class below has a method called list)
PULL_BATCH = 1000
RPC_TIMEOUT = 30.0


@dataclass
class Held:
    received: ReceivedMessage
    letter: DeadLetter
    acked: bool = False


Session = list[Held]
Groups = list[Session]  # the dead letters of one original message each
Ids = list[str]


class PubSubDeadLetters:
    def __init__(self, client: SubscriberClient, topology: Topology, publisher: PubSubPublisher) -> None:
        self._client = client
        self._topology = topology
        self._publisher = publisher

    async def list(self, *, limit: int | None = None) -> list[DeadLetter]:
        async with self._session(limit) as groups:
            return [listed(group, _letter) for group in groups]

    async def replay(
        self, *, validate: Callable[[Message], object], limit: int | None = None, dry_run: bool = False
    ) -> ReplayReport:
        """Each original once: one copy is published, then every copy of it is acked."""
        report = ReplayReport()
        async with self._session(limit) as groups:
            valid: Groups = []
            for group in groups:
                letter = group[0].letter
                try:
                    validate(Message(letter.body, letter.attributes, letter.message_id))
                except Exception as exc:
                    report.invalid[letter.message_id] = str(exc)
                    continue
                valid.append(group)
            if dry_run:
                report.replayed = [group[0].letter.message_id for group in valid]
                return report
            results = await asyncio.gather(
                *(
                    self._publisher.publish_to(
                        self._topology.topic_path, g[0].letter.body, pubsub.replay_attributes(g[0].letter)
                    )
                    for g in valid
                ),
                return_exceptions=True,
            )
            published: Session = []
            for group, result in zip(valid, results, strict=True):
                message_id = group[0].letter.message_id
                if isinstance(result, BaseException):  # not published: it stays dead-lettered
                    report.invalid[message_id] = f"could not publish: {result}"
                    continue
                published += group
                report.replayed.append(message_id)
                log.info("dlq.replayed", message_id=message_id, topic=self._topology.topic, copies=len(group))
            await self._ack(published)
        return report

    async def purge(self, *, limit: int | None = None, dry_run: bool = False) -> int:
        async with self._session(limit) as groups:
            held = [h for group in groups for h in group]
            if not dry_run:
                await self._ack(held)
            return len(held)

    async def _ack(self, held: Session) -> None:
        ids = [h.received.ack_id for h in held]
        for start in range(0, len(ids), PULL_BATCH):
            await asyncio.to_thread(
                self._client.acknowledge, subscription=self._path, ack_ids=ids[start : start + PULL_BATCH],
                timeout=RPC_TIMEOUT,
            )  # fmt: skip
        for h in held:
            h.acked = True

    @property
    def _path(self) -> str:
        return self._topology.dead_letter_subscription_path

    @contextlib.asynccontextmanager
    async def _session(self, limit: int | None) -> AsyncIterator[Groups]:
        """The oldest ``limit`` original messages' dead letters (every copy of each), held; everything
        not acked is nacked on exit."""
        everything = await asyncio.to_thread(self._pull_all)
        held = [Held(r, pubsub.dead_letter_of(r)) for r in everything]
        held.sort(key=lambda h: (h.letter.dead_lettered_at is None, h.letter.dead_lettered_at))
        groups = by_original(held, _letter)
        try:
            yield groups[:limit] if limit is not None else groups
        finally:
            back = [h.received.ack_id for h in held if not h.acked]
            if back:
                await asyncio.to_thread(self._nack, back)

    def _pull_all(self) -> Pulled:
        """Pull until two pulls in a row come back empty (``return_immediately`` may return fewer
        messages than there are on real Pub/Sub); de-duplicated by Pub/Sub message id."""
        from google.api_core.exceptions import NotFound

        found: dict[str, ReceivedMessage] = {}
        empty = 0
        while empty < 2:
            try:
                response = self._client.pull(
                    subscription=self._path, max_messages=PULL_BATCH, return_immediately=True,
                    timeout=RPC_TIMEOUT,
                )  # fmt: skip
            except NotFound as exc:
                raise BrokerOperationError(
                    f"no subscription {self._path!r} on Pub/Sub; run 'app.py setup' first"
                ) from exc
            received = list(response.received_messages)
            empty = 0 if received else empty + 1
            for r in received:  # a lease that ran out mid-session redelivers: the newer ack id wins
                found[r.message.message_id] = r
        return list(found.values())

    def _nack(self, ack_ids: Ids) -> None:
        for start in range(0, len(ack_ids), PULL_BATCH):
            self._client.modify_ack_deadline(
                subscription=self._path, ack_ids=ack_ids[start : start + PULL_BATCH],
                ack_deadline_seconds=0, timeout=RPC_TIMEOUT,
            )  # fmt: skip


def _letter(held: Held) -> DeadLetter:
    return held.letter
