"""GitHub issues for incidents (gidgethub over aiohttp): open with labels, comment on transitions, close on
resolve.

Idempotency is the caller's half of the contract: the handler stores the returned issue number and URL in
``incident.links`` in the same store transaction as the transition, and :meth:`GitHubIssues.open_issue`
returns the stored issue without calling GitHub. Every issue body carries the marker
``<!-- incidentd:<incident id> -->``. For the window left - GitHub created the issue, then the link was not
stored - a retry first calls :meth:`GitHubIssues.find_issue`, which finds the issue by that marker in the
repository's issue list (not the search API, whose index lags by up to a minute).

Errors are classified for the dispatcher: a 5xx, a rate limit, a timeout or a connection error is
:class:`TransientError` (retry later); any other 4xx (bad token, no access, unknown repository, rejected
fields) is :class:`PermanentError`, because retrying the same request cannot succeed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

import aiohttp
import gidgethub
import structlog
from gidgethub.aiohttp import GitHubAPI

from application.errors import PermanentError, TransientError
from application.incidents import Incident, TimelineEntry
from application.ports import ISSUE_LINK, ISSUE_URL_LINK, TrackedIssue
from common.closing import closing
from infra.http import parse_retry_after
from infra.incident_links import incident_links

if TYPE_CHECKING:
    from config.settings import Settings

log = structlog.get_logger(__name__)

SEVERITY_RANK = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
T = TypeVar("T")


def marker(incident: Incident) -> str:
    return f"<!-- incidentd:{incident.id} -->"


class GitHubIssues:
    """One repository's issues as incidentd's :class:`~application.ports.IssueTracker`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        repository: str,
        token: str,
        api_url: str = "https://api.github.com",
        labels: list[str] | None = None,
        min_severity: str = "critical",
    ) -> None:
        self._session = session
        self._gh = GitHubAPI(session, "incidentd", oauth_token=token, base_url=api_url.rstrip("/"))
        self._issues = f"/repos/{repository}/issues"
        self._labels = list(labels or [])
        self._min_rank = SEVERITY_RANK[min_severity]

    def tracks(self, incident: Incident) -> bool:
        return SEVERITY_RANK[incident.severity] >= self._min_rank

    async def open_issue(self, incident: Incident) -> TrackedIssue:
        """The issue already stored on the incident, or a new one."""
        if ISSUE_LINK in incident.links:
            return TrackedIssue(int(incident.links[ISSUE_LINK]), incident.links.get(ISSUE_URL_LINK, ""))
        data = {
            "title": f"[{incident.severity}] {incident.title}",
            "body": issue_body(incident),
            "labels": [*self._labels, f"severity:{incident.severity}"],
        }
        issue = await self._call("open issue", lambda: self._gh.post(self._issues, data=data))
        log.info("github issue opened", incident_id=str(incident.id), issue=issue["number"])
        return TrackedIssue(int(issue["number"]), str(issue.get("html_url", "")))

    async def find_issue(self, incident: Incident) -> TrackedIssue | None:
        """The issue with this incident's marker, among the repository's issues with our labels updated
        since the incident started (the issue list, not the search API: it has no indexing lag).

        Reads one page of 100, newest first: enough for the retry it serves, which follows the lost
        attempt by seconds to minutes.
        """
        query = urlencode(
            {"state": "all", "labels": ",".join(self._labels), "since": _iso(incident.created_at),
             "sort": "created", "direction": "desc", "per_page": "100"}
        )  # fmt: skip
        page: Any = await self._call("list issues", lambda: self._gh.getitem(f"{self._issues}?{query}"))
        for issue in page if isinstance(page, list) else []:
            if marker(incident) in (issue.get("body") or "") and "pull_request" not in issue:
                log.info("github issue found", incident_id=str(incident.id), issue=issue["number"])
                return TrackedIssue(int(issue["number"]), str(issue.get("html_url", "")))
        return None

    async def comment(self, incident: Incident, entry: TimelineEntry) -> None:
        """Comment on the incident's issue; nothing to do if it has none (not tracked)."""
        number = incident.links.get(ISSUE_LINK)
        if number is None:
            return
        url = f"{self._issues}/{number}/comments"
        data = {"body": comment_body(incident, entry)}
        await self._call("comment on issue", lambda: self._gh.post(url, data=data))

    async def close_issue(self, incident: Incident, entry: TimelineEntry) -> None:
        """Comment with the resolution, then close the issue (closing a closed issue is harmless)."""
        number = incident.links.get(ISSUE_LINK)
        if number is None:
            return
        await self.comment(incident, entry)
        data = {"state": "closed", "state_reason": "completed"}
        await self._call("close issue", lambda: self._gh.patch(f"{self._issues}/{number}", data=data))

    async def close(self) -> None:
        await self._session.close()

    @staticmethod
    async def _call(what: str, request: Callable[[], Awaitable[T]]) -> T:
        try:
            return await request()
        except gidgethub.RateLimitExceeded as exc:
            wait = max(exc.rate_limit.reset_datetime.timestamp() - time.time(), 1.0)
            raise TransientError(f"GitHub {what}: rate limit exceeded", retry_after=wait) from exc
        except gidgethub.GitHubBroken as exc:
            raise TransientError(f"GitHub {what}: {int(exc.status_code)} {exc}") from exc
        except gidgethub.HTTPException as exc:
            raise _classify_client_error(what, exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"GitHub {what}: {type(exc).__name__}: {exc}") from exc


def _classify_client_error(what: str, exc: gidgethub.HTTPException) -> Exception:
    """4xx are permanent, except throttling: 429, or a 403 with Retry-After (secondary rate limit)."""
    status = int(exc.status_code)
    retry_after = exc.headers.get("retry-after")
    if status == 429 or (status == 403 and retry_after):
        return TransientError(
            f"GitHub {what}: throttled ({status})", retry_after=parse_retry_after(retry_after)
        )
    return PermanentError(f"GitHub {what}: {status} {exc}")


def issue_body(incident: Incident) -> str:
    lines = [
        f"**Severity:** {incident.severity}",
        f"**Service:** {incident.service or '-'}",
        f"**Environment:** {incident.environment or '-'}",
        f"**Status:** {incident.status}",
        f"**Opened:** {incident.created_at.isoformat()}",
        f"**Incident:** `{incident.id}`",
    ]
    cluster = incident.enrichment.get("kubernetes", {}).get("summary")
    if cluster:
        lines.append(f"**Kubernetes:** {cluster}")
    description = _description(incident)
    if description:
        lines += ["", description]
    links = incident_links(incident)
    if links:
        lines += ["", *(f"- [{label}]({url})" for label, url in links)]
    return "\n".join([*lines, "", marker(incident)])


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _description(incident: Incident) -> str:
    """Alertmanager's ``description`` annotation, or the description of a manual incident."""
    annotations = incident.source_alert.get("annotations")
    if isinstance(annotations, dict) and isinstance(annotations.get("description"), str):
        return str(annotations["description"])
    description = incident.source_alert.get("description")
    return description if isinstance(description, str) else ""


def comment_body(incident: Incident, entry: TimelineEntry) -> str:
    text = (
        f"**{entry.kind}** by {entry.actor or 'unknown'} at {entry.at.isoformat()} (status: {entry.status})"
    )
    if entry.note:
        text += f"\n\n{entry.note}"
    return f"{text}\n\n{marker(incident)}"


def from_settings(settings: Settings) -> GitHubIssues:
    """Call inside the running event loop (aiohttp sessions belong to one loop)."""
    from infra.secrets import read_secret

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.github_timeout))
    return GitHubIssues(
        session,
        repository=settings.github_repository,
        token=read_secret(settings.github_token, settings.github_token_file),
        api_url=settings.github_api_url,
        labels=settings.github_labels,
        min_severity=settings.github_min_severity,
    )


@asynccontextmanager
async def open_issue_tracker(settings: Settings) -> AsyncIterator[GitHubIssues]:
    """The issue tracker on ``github_repository``; its HTTP session closed on exit."""
    tracker = from_settings(settings)
    async with closing(tracker):
        yield tracker
