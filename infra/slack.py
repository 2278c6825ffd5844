"""Slack notifications through incoming webhooks, one message per incident transition.

Routing: the first route whose ``match`` fits the incident (every key - service, environment, severity -
equals the incident's value or is in the listed values) picks the webhook; otherwise the default webhook;
with neither, the transition is not sent (logged at debug). Webhook URLs are secrets, read from the
settings (environment) or from files when the notifier is created.

Errors: 429 (with its Retry-After), 5xx, timeouts and connection errors are :class:`TransientError`;
other 4xx (``no_service``, ``channel_is_archived``, ``invalid_payload``...) are :class:`PermanentError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog

from application.errors import PermanentError, TransientError
from application.incidents import Incident, TimelineEntry
from common.closing import closing
from infra.http import parse_retry_after
from infra.incident_links import incident_links

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import SecretStr

    from config.settings import Settings

log = structlog.get_logger(__name__)

SEVERITY_ICON = {
    "critical": ":red_circle:",
    "high": ":large_orange_circle:",
    "medium": ":large_yellow_circle:",
}
TRANSITION = {
    "opened": "opened",
    "occurrence": "fired again",
    "acknowledged": "acknowledged",
    "unacknowledged": "unacknowledged",
    "assigned": "assigned",
    "note": "note added",
    "resolved": "resolved",
    "action": "action taken",
}


@dataclass(frozen=True)
class Route:
    match: Mapping[str, frozenset[str]]
    webhook_url: str

    def fits(self, incident: Incident) -> bool:
        return all(str(getattr(incident, key)) in values for key, values in self.match.items())


class SlackNotifier:
    """Incoming-webhook notifier; the :class:`~application.ports.Notifier` for Slack."""

    def __init__(
        self, session: aiohttp.ClientSession, routes: Sequence[Route], default_url: str = ""
    ) -> None:
        self._session = session
        self._routes = tuple(routes)
        self._default = default_url

    def webhook_for(self, incident: Incident) -> str:
        """The first matching route's webhook, else the default ("" when there is none)."""
        return next((r.webhook_url for r in self._routes if r.fits(incident)), self._default)

    async def notify(self, incident: Incident, entry: TimelineEntry) -> None:
        url = self.webhook_for(incident)
        if not url:
            log.debug("no slack route for incident", incident_id=str(incident.id), service=incident.service)
            return
        await self._post(url, {"text": render(incident, entry)})

    async def _post(self, url: str, payload: dict[str, str]) -> None:
        try:
            async with self._session.post(url, json=payload) as response:
                body = (await response.text())[:200]
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"Slack webhook: {type(exc).__name__}: {exc}") from exc
        if status < 300:
            return
        if status == 429:
            raise TransientError("Slack webhook: rate limited", retry_after=parse_retry_after(retry_after))
        if status >= 500:
            raise TransientError(f"Slack webhook: {status} {body}")
        raise PermanentError(f"Slack webhook: {status} {body}")

    async def close(self) -> None:
        await self._session.close()


def render(incident: Incident, entry: TimelineEntry) -> str:
    """Slack mrkdwn: headline, the facts, the note, the links."""
    icon = SEVERITY_ICON.get(incident.severity, ":white_circle:")
    if entry.kind == "resolved":
        icon = ":white_check_mark:"
    what = TRANSITION.get(entry.kind, entry.kind)
    lines = [
        f"{icon} *[{incident.severity.upper()}] {_escape(incident.title)}* {what}"
        + (f" by {_escape(entry.actor)}" if entry.actor else ""),
        f"*Severity:* {incident.severity} | *Service:* {_escape(incident.service or '-')} | "
        f"*Environment:* {_escape(incident.environment or '-')} | *Status:* {incident.status}",
    ]
    if entry.note:
        lines.append(f"> {_escape(entry.note)}")
    cluster = incident.enrichment.get("kubernetes", {}).get("summary")
    if cluster:
        lines.append(f"*Kubernetes:* {_escape(cluster)}")
    links = incident_links(incident)
    if links:
        lines.append(" | ".join(f"<{_escape(url)}|{_escape(label)}>" for label, url in links))
    return "\n".join(lines)


def _escape(text: str) -> str:
    """Slack's three control characters; everything else is sent as is."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _webhook(value: SecretStr, file: Path | None, setting: str) -> str:
    """The webhook URL, checked at start-up: a URL without a scheme would fail every message later, and
    show itself whole in the error."""
    from config.settings import HTTP, url_problem
    from infra.secrets import read_secret

    url = read_secret(value, file)
    problem = url and url_problem(url, HTTP)
    if problem:
        raise ValueError(f"invalid setting {setting}{' (file ' + str(file) + ')' if file else ''}: {problem}")
    return url


def from_settings(settings: Settings) -> SlackNotifier:
    """Call inside the running event loop (aiohttp sessions belong to one loop)."""
    routes = [
        Route(
            match={
                key: frozenset([value] if isinstance(value, str) else value)
                for key, value in route.match.items()
            },
            webhook_url=_webhook(
                route.webhook_url, route.webhook_url_file, f"slack_routes.{number}.webhook_url"
            ),
        )
        for number, route in enumerate(settings.slack_routes)
    ]
    default = _webhook(
        settings.slack_default_webhook_url,
        settings.slack_default_webhook_url_file,
        "slack_default_webhook_url",
    )
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.slack_timeout))
    return SlackNotifier(session, routes, default)


@asynccontextmanager
async def open_notifier(settings: Settings) -> AsyncIterator[SlackNotifier]:
    """The notifier posting to the configured webhooks; its HTTP session closed on exit."""
    notifier = from_settings(settings)
    async with closing(notifier):
        yield notifier
