"""AI analysis against the model stand-in: what reaches the model, what lands on the timeline, and how
every failure is recorded without failing the message (docs/ai.md)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from application.analysis import REDACTED, parse_answer
from application.errors import PermanentError
from application.ports import TrackedIssue
from tests.ai.conftest import AiWorld, labelled, make_world
from tests.standins.llm import Behaviour, ModelStandIn

SECRETS = (
    "hunter2-db-pass",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "xoxb-123456789012-abcdefghijkl",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ24",
)


def with_secrets(case: dict[str, Any]) -> dict[str, Any]:
    """The labelled Alertmanager case with secrets in its labels and annotations, by name and by shape."""
    case = copy.deepcopy(case)
    alert = case["data"]["alerts"][0]
    alert["labels"]["db_password"] = SECRETS[0]
    alert["labels"]["aws_key"] = SECRETS[1]
    alert["annotations"]["description"] += f" (debug: token {SECRETS[2]}, slack {SECRETS[3]})"
    alert["annotations"]["session"] = SECRETS[4]
    return case


async def test_an_opened_incident_gets_a_validated_analysis_grounded_in_its_runbook(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """A critical alert opens an incident; the worker publishes one analysis request; the model is sent
    the incident, its labels and annotations and the top runbook passages - and no secret; the answer is
    validated and stored: a timeline entry by "ai" and a record citing the postgres runbook."""
    case = with_secrets(labelled("postgres-too-many-connections.md"))
    incident = await world.feed_case(case)
    assert len(world.published.requests) == 1
    await world.run_requests()

    [call] = llm.calls
    prompt = call.prompt
    assert "orders database: 96% of max_connections in use" in prompt  # the annotation
    assert "labels.alertname: PostgresTooManyConnections" in prompt
    assert "[postgres-too-many-connections.md#diagnosis]" in prompt  # a retrieved passage, with its text
    assert "pg_stat_activity" in prompt
    for secret in SECRETS:
        assert secret not in prompt
    assert f"labels.db_password: {REDACTED}" in prompt

    [record] = await world.records(incident)
    assert record.outcome == "ok" and record.answer is not None
    assert record.answer.cited and all(
        c.startswith("postgres-too-many-connections.md#") for c in record.answer.cited
    )
    assert record.model == "openai/standin-1" and record.input_tokens > 0 and record.output_tokens > 0
    assert record.passages[0]["source"] == "postgres-too-many-connections.md"
    [note] = await world.entries(incident)
    assert "next: follow the runbook's diagnosis [postgres-too-many-connections.md#" in note
    assert "openai/standin-1" in note


async def test_a_redelivered_request_is_not_analysed_twice(world: AiWorld, llm: ModelStandIn) -> None:
    """The same request delivered again (same key) finds its answer stored: no second model call, no
    second entry."""
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    [request] = world.published.requests
    world.published.requests.append(request)
    await world.run_requests()
    assert len(llm.calls) == 1
    assert len(await world.entries(incident)) == 1


async def test_the_same_context_is_answered_from_the_cache(world: AiWorld, llm: ModelStandIn) -> None:
    """Asking again while nothing changed (the context's digest is the same) records a cached analysis
    and costs no model call."""
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    await world.analyze(incident, "cli-again")
    assert len(llm.calls) == 1
    first, second = await world.records(incident)
    assert (first.outcome, second.outcome) == ("ok", "cached")
    assert second.answer == first.answer and second.input_tokens == 0
    assert (await world.entries(incident))[1].startswith("cached, same context as before: ")


async def test_an_invalid_answer_is_retried_once_with_the_validation_error(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """Free text, then a valid answer: the second call carries the first answer and what was wrong with
    it; the valid answer is stored."""
    llm.script(Behaviour(text="The database is probably overloaded."))
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    _, second = llm.calls
    assert "Your answer did not validate" in second.prompt
    assert "The database is probably overloaded." in second.prompt
    [record] = await world.records(incident)
    assert record.outcome == "ok"


async def test_citing_a_passage_it_was_not_given_is_invalid(world: AiWorld, llm: ModelStandIn) -> None:
    """An answer that cites a runbook passage not in its prompt fails validation (grounding); twice in a
    row, the analysis is recorded as failed, naming the citation."""
    llm.script(Behaviour(cite="made-up.md#step"), Behaviour(cite="made-up.md#step"))
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    assert len(llm.calls) == 2
    assert "made-up.md#step" in llm.calls[1].prompt  # the validation error told the model
    [record] = await world.records(incident)
    assert record.outcome == "failed" and record.answer is None
    assert record.error.startswith("invalid answer after one retry: next_steps.0.cites")
    [note] = await world.entries(incident)
    assert note.startswith("failed: invalid answer after one retry")


async def test_a_429_is_recorded_with_its_retry_after_and_later_requests_wait(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """Throttled (429, Retry-After 120): recorded as failed with the delay; the handler returns (the
    message is acked); a request during the delay is recorded as skipped without calling the model."""
    llm.script(Behaviour(status=429, headers={"Retry-After": "120"}))
    first = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    second = await world.feed_case(labelled("kafka-consumer-lag.md"), "m-2")
    await world.run_requests()
    assert len(llm.calls) == 1
    [throttled] = await world.records(first)
    assert (
        throttled.outcome == "failed" and "429" in throttled.error and "Retry-After 120 s" in throttled.error
    )
    [skipped] = await world.records(second)
    assert skipped.outcome == "skipped" and "asked to wait" in skipped.error


@pytest.mark.parametrize("status", [500, 503, 401, 400])
async def test_endpoint_errors_are_recorded_not_raised(
    world: AiWorld, llm: ModelStandIn, status: int
) -> None:
    """5xx and 4xx answers become a failed analysis on the timeline naming the status; nothing raises, so
    the analyze message is acked rather than retried or dead-lettered."""
    llm.script(Behaviour(status=status))
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    [record] = await world.records(incident)
    assert record.outcome == "failed" and f"answered {status}" in record.error


async def test_a_model_that_does_not_answer_in_time_is_recorded_as_timed_out(
    store: Any, llm: ModelStandIn
) -> None:
    """A model slower than ``timeout``: the analysis is recorded as failed after the timeout."""
    llm.script(Behaviour(delay=3))
    async for world in make_world(store, llm, timeout=0.5):
        incident = await world.feed_case(labelled("kube-oomkilled.md"))
        await world.run_requests()
        [record] = await world.records(incident)
        assert record.outcome == "failed" and record.error == "the model did not answer within 0.5 s"


async def test_an_answer_cut_off_at_the_token_limit_is_retried_then_recorded(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """finish_reason "length" twice: the retry asks for a briefer answer; then recorded as failed."""
    llm.script(Behaviour(truncated=True), Behaviour(truncated=True))
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    assert "cut off at the output token limit" in llm.calls[1].prompt
    [record] = await world.records(incident)
    assert record.outcome == "failed" and "cut off" in record.error


async def test_a_context_that_cannot_fit_the_budget_is_recorded_without_a_call(
    store: Any, llm: ModelStandIn
) -> None:
    """A token budget too small for even the incident itself: recorded as failed (budget exceeded), and
    the model is never called."""
    async for world in make_world(store, llm, token_budget=1200, max_output_tokens=400):
        incident = await world.feed_case(labelled("kube-oomkilled.md"))
        await world.run_requests()
        assert llm.calls == []
        [record] = await world.records(incident)
        assert record.outcome == "failed" and record.error.startswith("token budget exceeded")


async def test_a_tight_budget_trims_the_least_useful_sections_first(store: Any, llm: ModelStandIn) -> None:
    """A budget that fits the incident but not everything: passages beyond the first go before the
    incident's own facts, and the record says what was trimmed."""
    async for world in make_world(store, llm, token_budget=3200, max_output_tokens=400, top_k=5):
        incident = await world.feed_case(labelled("postgres-too-many-connections.md"))
        await world.run_requests()
        [record] = await world.records(incident)
        assert record.outcome == "ok", record.error
        assert record.trimmed and len(record.passages) < 5
        assert "PostgresTooManyConnections" in llm.calls[0].prompt


async def test_the_hourly_cap_skips_analyses_beyond_it(store: Any, llm: ModelStandIn) -> None:
    """With a cap of one analysis per hour, the second incident's analysis is recorded as skipped."""
    async for world in make_world(store, llm, max_per_hour=1):
        await world.feed_case(labelled("kube-oomkilled.md"))
        second = await world.feed_case(labelled("kafka-consumer-lag.md"), "m-2")
        await world.run_requests()
        assert len(llm.calls) == 1
        [record] = await world.records(second)
        assert record.outcome == "skipped" and "hourly cap of 1" in record.error


async def test_incidents_below_the_minimum_severity_are_not_analysed_unless_asked(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """A medium incident (minimum: high) publishes no request; ``incidents analyze`` still analyses it."""
    case = copy.deepcopy(labelled("kube-oomkilled.md"))
    case["data"]["alerts"][0]["labels"]["severity"] = "warning"
    incident = await world.feed_case(case)
    assert world.published.requests == []
    await world.analyze(incident)
    [record] = await world.records(incident)
    assert record.outcome == "ok" and record.reason == "requested"


async def test_a_correlated_incident_joining_the_group_re_analyses_its_first_incident(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """A second checkout incident within the correlation window joins the first one's group; the first
    incident is analysed again, and its context now lists the newcomer."""
    first = await world.feed_case(labelled("http-5xx-error-rate.md"))
    await world.run_requests()
    joiner = copy.deepcopy(labelled("http-latency-p99.md"))
    joiner["data"]["alerts"][0]["labels"].update(
        service="checkout", environment="production", severity="high"
    )
    second = await world.feed_case(joiner, "m-2")
    requests = [json.loads(body) for body, _, _ in world.published.requests]
    assert sorted(r["reason"] for r in requests) == ["correlated", "opened"]
    await world.run_requests()
    [_, again] = await world.records(first)
    assert again.reason == "correlated" and again.outcome == "ok"
    assert str(second.id) in llm.calls[-1].prompt or str(second.id) in llm.calls[-2].prompt


async def test_analysis_never_triggers_an_action(world: AiWorld, llm: ModelStandIn) -> None:
    """Action rules answer events, not analyses: with a rule that would restart on this alert's labels,
    the analyze command asks the action runner for nothing, even when the answer suggests a restart."""
    asked: list[Any] = []

    class Recording:
        def plan(self, trigger: Any) -> list[Any]:
            asked.append(trigger)
            return []

        async def run(self, action: Any, incident: Any) -> str:
            raise AssertionError("no action may run")

    world.extra["actions"] = Recording()
    incident = await world.feed_case(labelled("kube-pod-crashlooping.md"))
    before = len(asked)
    llm.script(
        Behaviour(
            text=json.dumps({"summary": "restart it", "next_steps": [{"step": "kubectl rollout restart"}]})
        )
    )
    await world.run_requests()
    assert len(asked) == before
    [record] = await world.records(incident)
    assert record.outcome == "ok"
    found = await world.store.get(incident.id)
    assert [e.kind for e in found.timeline] == ["opened", "analysis"]


async def test_an_unknown_incident_id_is_a_dead_letter(world: AiWorld) -> None:
    """``incident.analyze`` for an id no incident has: PermanentError (dead-lettered with the reason)."""
    with pytest.raises(PermanentError, match="no incident"):
        await world.feed("incident.analyze", {"incident_id": "00000000-0000-0000-0000-000000000000"}, "x")


async def test_with_ai_off_an_analyze_command_is_dead_lettered_with_the_reason(world: AiWorld) -> None:
    """A worker with AI off refuses incident.analyze with a reason saying so (replayable once it is on)."""
    world.analysis = None  # type: ignore[assignment]
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    with pytest.raises(PermanentError, match="AI analysis is disabled"):
        await world.analyze(incident)


async def test_the_analysis_is_posted_to_slack_and_the_github_issue(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """With Slack and GitHub on, the analysis entry is sent once to each: as the incident's "analysis"
    message, and as a comment on the issue the incident's opening got."""
    sent: list[tuple[str, str, str]] = []

    class Notifier:
        async def notify(self, incident: Any, entry: Any) -> None:
            sent.append(("slack", entry.kind, entry.note))

    class Tracker:
        def tracks(self, incident: Any) -> bool:
            return True

        async def open_issue(self, incident: Any) -> TrackedIssue:
            return TrackedIssue(7, "https://github.example/acme/ops/issues/7")

        async def find_issue(self, incident: Any) -> None:
            return None

        async def comment(self, incident: Any, entry: Any) -> None:
            sent.append(("github", entry.kind, entry.note))

        async def close_issue(self, incident: Any, entry: Any) -> None:
            raise AssertionError("not resolved")

    world.extra.update(notifier=Notifier(), issue_tracker=Tracker())
    await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    analysis = [(where, note) for where, kind, note in sent if kind == "analysis"]
    assert [where for where, _ in analysis] == ["slack", "github"]
    assert all("kube-oomkilled.md#" in note for _, note in analysis)


def test_answers_are_validated_against_the_passages_given() -> None:
    """The answer model: JSON inside a markdown fence is accepted; a confidence above 1, a cause without
    evidence and a citation of an unknown passage are not."""
    good = {"summary": "s", "probable_causes": [{"cause": "c", "confidence": 0.5, "evidence": ["e"]}],
            "next_steps": [{"step": "x", "cites": ["a.md#b"]}]}  # fmt: skip
    assert parse_answer("```json\n" + json.dumps(good) + "\n```", ["a.md#b"]).cited == ["a.md#b"]
    for bad in ({**good, "probable_causes": [{"cause": "c", "confidence": 1.5, "evidence": ["e"]}]},
                {**good, "probable_causes": [{"cause": "c", "confidence": 0.5, "evidence": []}]},
                {**good, "next_steps": [{"step": "x", "cites": ["other.md#b"]}]}):  # fmt: skip
        with pytest.raises(ValueError):
            parse_answer(json.dumps(bad), ["a.md#b"])


async def test_a_question_asked_with_the_request_is_put_to_the_model(
    world: AiWorld, llm: ModelStandIn
) -> None:
    """``incidents analyze ID --note "..."``: the question closes the prompt (redacted like the rest), is
    part of the context's digest (no cached answer to another question), and heads the timeline entry."""
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    await world.analyze(incident, "cli-q", note="Did the rollback help? token=abc123secret")
    assert len(llm.calls) == 2
    prompt = llm.calls[1].prompt
    assert prompt.rstrip().endswith(
        f"## Question from the on-call engineer\nDid the rollback help? {REDACTED}"
    )
    assert "abc123secret" not in prompt
    assert (await world.records(incident))[1].outcome == "ok"
    assert (await world.entries(incident))[1].startswith(f"asked 'Did the rollback help? {REDACTED}': ")


async def test_an_unexpected_adapter_error_is_recorded_too(world: AiWorld) -> None:
    """An exception the adapter did not classify (a bug) is recorded as a failed analysis, not raised."""

    class Broken:
        name = "broken/1"

        async def complete(self, system: str, turns: Any, *, max_tokens: int) -> Any:
            raise RuntimeError("boom")

    world.analysis.analyst = Broken()
    incident = await world.feed_case(labelled("kube-oomkilled.md"))
    await world.run_requests()
    [record] = await world.records(incident)
    assert record.outcome == "failed" and "RuntimeError('boom')" in record.error
