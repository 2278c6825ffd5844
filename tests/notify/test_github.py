"""GitHub issues for incidents, against a local stand-in of the REST API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from application.errors import PermanentError, TransientError
from application.incidents import Incident
from application.ports import ISSUE_LINK, ISSUE_URL_LINK
from config.settings import load
from infra.github import GitHubIssues, from_settings
from tests.standins.chat import REPO, TOKEN, GitHub, unused_port

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def incident(severity: str = "critical", **fields: Any) -> Incident:
    return Incident.open(
        at=NOW,
        actor="alertmanager",
        message_id="m-1",
        title="API 5xx above 5%",
        service="api",
        environment="prod",
        severity=severity,
        source="alertmanager",
        dedup_key="am:abc",
        runbook_url="https://runbooks.example/api-5xx",
        source_alert={
            "generatorURL": "http://prometheus.example/graph?g0.expr=rate",
            "annotations": {"description": "5xx ratio is 7% on api"},
        },
        **fields,
    )


@pytest.fixture
async def make_tracker(github: GitHub, tmp_path: Path) -> AsyncIterator[Callable[..., GitHubIssues]]:
    """Trackers built from settings the way the container builds them; the token comes from a file."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    trackers: list[GitHubIssues] = []

    def make(**overrides: Any) -> GitHubIssues:
        options: dict[str, Any] = {
            "github_enabled": True,
            "github_api_url": github.url,
            "github_repository": REPO,
            "github_token_file": token_file,
            "github_timeout": 2.0,
            **overrides,
        }
        tracker = from_settings(load(**options))
        trackers.append(tracker)
        return tracker

    yield make
    for tracker in trackers:
        await tracker.close()


async def test_an_issue_is_opened_with_labels_severity_service_and_links(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """A critical incident opens one issue in the configured repository, labelled, with severity, service,
    description, runbook and Alertmanager links in its body, and the incident marker."""
    tracker = make_tracker()
    inc = incident()

    issue = await tracker.open_issue(inc)

    assert (issue.number, issue.url) == (1, f"https://github.com/{REPO}/issues/1")
    created = github.issues[1]
    assert created["title"] == "[critical] API 5xx above 5%"
    assert [label["name"] for label in created["labels"]] == ["incident", "severity:critical"]
    body = created["body"]
    for expected in (
        "**Severity:** critical",
        "**Service:** api",
        "**Environment:** prod",
        "5xx ratio is 7% on api",
        "[Runbook](https://runbooks.example/api-5xx)",
        "(http://prometheus.example/graph?g0.expr=rate)",
        f"<!-- incidentd:{inc.id} -->",
    ):
        assert expected in body
    assert github.requests[0].headers["Authorization"] == f"token {TOKEN}"


async def test_an_issue_stored_on_the_incident_is_never_opened_twice(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """Redelivery of the message that opened the issue returns the stored issue without calling GitHub."""
    tracker = make_tracker()
    inc = incident()
    issue = await tracker.open_issue(inc)
    inc.links[ISSUE_LINK], inc.links[ISSUE_URL_LINK] = str(issue.number), issue.url

    again = await tracker.open_issue(inc)

    assert again == issue
    assert len(github.issues) == 1
    assert len(github.requests) == 1


async def test_transitions_are_commented_and_resolving_closes_the_issue(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """Acknowledging comments who did it; resolving comments the note and closes the issue."""
    tracker = make_tracker()
    inc = incident()
    issue = await tracker.open_issue(inc)
    inc.links[ISSUE_LINK] = str(issue.number)

    inc.acknowledge(at=NOW, actor="alice", message_id="m-2", note="looking")
    await tracker.comment(inc, inc.timeline[-1])
    inc.resolve(at=NOW, actor="bob", message_id="m-3", note="rolled back v42")
    await tracker.close_issue(inc, inc.timeline[-1])

    first, second = github.comments[1]
    assert "**acknowledged** by alice" in first and "looking" in first
    assert "**resolved** by bob" in second and "rolled back v42" in second
    assert github.issues[1]["state"] == "closed"


async def test_an_incident_without_an_issue_is_not_commented(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """Transitions of an incident that never got an issue (below the severity rule) call nothing."""
    tracker = make_tracker()
    inc = incident("low")
    inc.resolve(at=NOW, actor="bob", message_id="m-3")
    await tracker.comment(inc, inc.timeline[-1])
    await tracker.close_issue(inc, inc.timeline[-1])
    assert github.requests == []


async def test_the_severity_rule_selects_which_incidents_get_an_issue(
    make_tracker: Callable[..., GitHubIssues],
) -> None:
    """By default only critical incidents get an issue; github_min_severity lowers the bar."""
    default, from_high = make_tracker(), make_tracker(github_min_severity="high")
    assert [default.tracks(incident(s)) for s in ("critical", "high")] == [True, False]
    assert [from_high.tracks(incident(s)) for s in ("critical", "high", "medium")] == [True, True, False]


@pytest.mark.parametrize(
    ("status", "body", "headers", "error"),
    [
        (500, {"message": "Server Error"}, {}, TransientError),
        (502, "<html>Bad Gateway</html>", {}, TransientError),
        (404, {"message": "Not Found"}, {}, PermanentError),
        (
            422,
            {"message": "Validation Failed", "errors": [{"code": "invalid", "field": "labels"}]},
            {},
            PermanentError,
        ),
        (403, {"message": "Resource not accessible by integration"}, {}, PermanentError),
    ],
)
async def test_http_errors_are_classified(
    github: GitHub,
    make_tracker: Callable[..., GitHubIssues],
    status: int,
    body: Any,
    headers: dict[str, str],
    error: type[Exception],
) -> None:
    """GitHub's 5xx are worth retrying; other client errors dead-letter at once."""
    github.fail_next(status, body, headers)
    with pytest.raises(error, match=str(status)):
        await make_tracker().open_issue(incident())


async def test_a_wrong_token_or_repository_is_permanent(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """Bad credentials (401) and an unknown repository (404) cannot succeed on retry."""
    with pytest.raises(PermanentError, match="401"):
        await make_tracker(github_token="wrong", github_token_file=None).open_issue(incident())
    with pytest.raises(PermanentError, match="404"):
        await make_tracker(github_repository="acme/elsewhere").open_issue(incident())


async def test_rate_limits_are_transient_with_the_wait(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """The primary rate limit (403, remaining 0) retries after the reset; a secondary limit (403 or 429
    with Retry-After) after the given seconds."""
    reset = int(datetime.now(UTC).timestamp()) + 120
    limited = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
    github.fail_next(403, {"message": "API rate limit exceeded"}, limited)
    with pytest.raises(TransientError) as primary:
        await make_tracker().open_issue(incident())
    assert primary.value.retry_after is not None and 100 < primary.value.retry_after <= 121

    for status in (403, 429):
        github.fail_next(status, {"message": "secondary rate limit"}, {"Retry-After": "60"})
        with pytest.raises(TransientError) as secondary:
            await make_tracker().open_issue(incident())
        assert secondary.value.retry_after == 60


async def test_unreachable_or_slow_github_is_transient(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """A refused connection and a request over github_timeout are retried later, not dead-lettered."""
    with pytest.raises(TransientError, match="Connect"):
        await make_tracker(github_api_url=f"http://127.0.0.1:{unused_port()}").open_issue(incident())
    github.delay = 0.5
    with pytest.raises(TransientError, match="Timeout"):
        await make_tracker(github_timeout=0.1).open_issue(incident())


async def test_find_issue_finds_the_issue_an_earlier_attempt_opened_by_its_marker(
    github: GitHub, make_tracker: Callable[..., GitHubIssues]
) -> None:
    """After an attempt that opened an issue but lost its number, find_issue lists the repository's
    issues with our labels (state all, since the incident started) and returns the one carrying this
    incident's marker - closed or not - and nothing for an incident that has none."""
    tracker = make_tracker()
    lost, other, never = incident(), incident(), incident()
    opened = await tracker.open_issue(lost)
    await tracker.open_issue(other)
    await tracker.close_issue(
        lost.model_copy(update={"links": {ISSUE_LINK: str(opened.number)}}), lost.timeline[-1]
    )

    assert await tracker.find_issue(lost) == opened
    assert await tracker.find_issue(never) is None
    listed = [r for r in github.requests if r.method == "GET"]
    assert len(listed) == 2
    query = listed[0].query
    assert (query["state"], query["labels"], query["since"]) == ("all", "incident", "2026-11-23T12:00:00Z")
