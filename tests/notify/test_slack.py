"""Slack incoming-webhook notifications, against a local stand-in of hooks.slack.com."""

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
from infra.slack import SlackNotifier, from_settings
from tests.standins.chat import Slack, unused_port

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
DEFAULT, API, PROD = "/services/T0/B-default/x", "/services/T0/B-api/x", "/services/T0/B-prod/x"


def incident(
    service: str = "api", environment: str = "prod", severity: str = "critical", **fields: Any
) -> Incident:
    return Incident.open(
        at=NOW,
        actor="alertmanager",
        message_id="m-1",
        title=fields.pop("title", "API 5xx above 5%"),
        service=service,
        environment=environment,
        severity=severity,
        source="alertmanager",
        dedup_key="am:abc",
        **fields,
    )


@pytest.fixture
async def make_notifier(slack: Slack, tmp_path: Path) -> AsyncIterator[Callable[..., SlackNotifier]]:
    """Notifiers built from settings as the container builds them: the api route's URL is in a file."""
    api_url = tmp_path / "slack-api"
    api_url.write_text(slack.url + API + "\n")
    routes = [
        {"match": {"service": "api"}, "webhook_url_file": str(api_url)},
        {"match": {"environment": "prod", "severity": ["critical", "high"]}, "webhook_url": slack.url + PROD},
    ]
    notifiers: list[SlackNotifier] = []

    def make(**overrides: Any) -> SlackNotifier:
        options = {
            "slack_enabled": True,
            "slack_routes": routes,
            "slack_default_webhook_url": slack.url + DEFAULT,
            "slack_timeout": 2.0,
            **overrides,
        }
        notifier = from_settings(load(**options))
        notifiers.append(notifier)
        return notifier

    yield make
    for notifier in notifiers:
        await notifier.close()


async def test_routes_pick_the_first_matching_webhook_else_the_default(
    slack: Slack, make_notifier: Callable[..., SlackNotifier]
) -> None:
    """service=api goes to the api channel even in prod (first match wins); other prod incidents go to
    the prod channel only when critical or high; everything else to the default webhook."""
    notifier = make_notifier()
    cases = {
        "api-prod-critical": incident("api", "prod", "critical"),
        "web-prod-high": incident("web", "prod", "high"),
        "web-prod-low": incident("web", "prod", "low"),
        "web-staging-critical": incident("web", "staging", "critical"),
    }
    for name, inc in cases.items():
        await notifier.notify(inc.model_copy(update={"title": name}), inc.timeline[-1])

    def titles(hook: str) -> list[str]:
        return [name for name in cases for text in slack.received(hook) if f"] {name}*" in text]

    assert titles(API) == ["api-prod-critical"]
    assert titles(PROD) == ["web-prod-high"]
    assert titles(DEFAULT) == ["web-prod-low", "web-staging-critical"]


async def test_without_a_matching_route_or_default_nothing_is_sent(
    slack: Slack, make_notifier: Callable[..., SlackNotifier]
) -> None:
    """With no default webhook, an incident no route matches is not sent anywhere (and is no error)."""
    notifier = make_notifier(slack_default_webhook_url="")
    inc = incident("web", "staging", "low")
    await notifier.notify(inc, inc.timeline[-1])
    assert slack.requests == []


async def test_the_message_carries_the_facts_the_note_and_the_links(
    slack: Slack, make_notifier: Callable[..., SlackNotifier]
) -> None:
    """One message per transition with title, severity, service, status, who did it, the note, and
    links to the runbook, the Alertmanager source graph and the GitHub issue; Slack's control
    characters in text are escaped so a title cannot break the message."""
    inc = incident(
        title="p99 > 2s & rising <api>",
        runbook_url="https://runbooks.example/latency",
        source_alert={"generatorURL": "http://prometheus.example/graph?g0.expr=x&g0.tab=1"},
    )
    inc.links[ISSUE_LINK], inc.links[ISSUE_URL_LINK] = "42", "https://github.com/acme/ops/issues/42"
    inc.acknowledge(at=NOW, actor="alice", message_id="m-2", note="rolling back")

    await make_notifier().notify(inc, inc.timeline[-1])

    [text] = slack.received(API)
    assert "*[CRITICAL] p99 &gt; 2s &amp; rising &lt;api&gt;* acknowledged by alice" in text
    assert "*Service:* api" in text and "*Environment:* prod" in text and "*Status:* acknowledged" in text
    assert "> rolling back" in text
    assert "<https://runbooks.example/latency|Runbook>" in text
    assert "<http://prometheus.example/graph?g0.expr=x&amp;g0.tab=1|Alertmanager source>" in text
    assert "<https://github.com/acme/ops/issues/42|GitHub issue #42>" in text


async def test_resolution_is_announced(slack: Slack, make_notifier: Callable[..., SlackNotifier]) -> None:
    """Resolving sends its own message with the resolved status."""
    inc = incident()
    inc.resolve(at=NOW, actor="bob", message_id="m-3")
    await make_notifier().notify(inc, inc.timeline[-1])
    [text] = slack.received(API)
    assert ":white_check_mark:" in text and "resolved by bob" in text and "*Status:* resolved" in text


async def test_an_unknown_webhook_is_permanent(
    slack: Slack, make_notifier: Callable[..., SlackNotifier]
) -> None:
    """A removed webhook (404 no_service) cannot succeed later: dead-letter, with Slack's reason."""
    notifier = make_notifier(slack_routes=[], slack_default_webhook_url=slack.url + "/services/T0/gone/x")
    inc = incident()
    with pytest.raises(PermanentError, match="404 no_service"):
        await notifier.notify(inc, inc.timeline[-1])


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "retry_after"),
    [
        (429, "rate_limited", {"Retry-After": "7"}, TransientError, 7.0),
        (500, "rollup_error", {}, TransientError, None),
        (503, "service unavailable", {}, TransientError, None),
        (400, "invalid_payload", {}, PermanentError, None),
        (410, "channel_is_archived", {}, PermanentError, None),
    ],
)
async def test_http_errors_are_classified(
    slack: Slack,
    make_notifier: Callable[..., SlackNotifier],
    status: int,
    body: str,
    headers: dict[str, str],
    error: type[Exception],
    retry_after: float | None,
) -> None:
    """429 retries after Slack's Retry-After and 5xx retry; other 4xx dead-letter."""
    slack.fail_next(status, body, headers)
    inc = incident()
    with pytest.raises(error) as raised:
        await make_notifier().notify(inc, inc.timeline[-1])
    if isinstance(raised.value, TransientError):
        assert raised.value.retry_after == retry_after


async def test_unreachable_or_slow_slack_is_transient(
    slack: Slack, make_notifier: Callable[..., SlackNotifier]
) -> None:
    """A refused connection and a request over slack_timeout are retried later."""
    inc = incident()
    refused = make_notifier(slack_routes=[], slack_default_webhook_url=f"http://127.0.0.1:{unused_port()}/x")
    with pytest.raises(TransientError, match="Connect"):
        await refused.notify(inc, inc.timeline[-1])
    slack.delay = 0.5
    with pytest.raises(TransientError, match="Timeout"):
        await make_notifier(slack_timeout=0.1).notify(inc, inc.timeline[-1])
