"""The retrieval quality bar (docs/ai.md): recall@3 of the runbook index on the labelled incidents."""

from __future__ import annotations

from tests.ai.recall import rank_all


async def test_recall_at_3_on_the_labelled_incidents_is_at_least_0_9() -> None:
    """At least 90% of the 38 labelled incidents (Alertmanager, OEC, AWS Health, Security Hub) find their
    runbook among the top 3 passages - with and without identifiers in the query."""
    for words_only in (False, True):
        ranked = await rank_all(words_only=words_only)
        assert len(ranked) >= 30
        assert sum(r.hit(3) for r in ranked) / len(ranked) >= 0.9, [r for r in ranked if not r.hit(3)]
