"""The links people want next to an incident; the GitHub and Slack adapters both show these."""

from __future__ import annotations

from application.incidents import Incident
from application.ports import ISSUE_LINK, ISSUE_URL_LINK


def incident_links(incident: Incident) -> list[tuple[str, str]]:
    """(label, url) pairs: runbook, the Alertmanager generatorURL (the graph that fired), the GitHub issue."""
    links = []
    if incident.runbook_url:
        links.append(("Runbook", incident.runbook_url))
    generator = incident.source_alert.get("generatorURL")
    if isinstance(generator, str) and generator:
        links.append(("Alertmanager source", generator))
    issue_url = incident.links.get(ISSUE_URL_LINK)
    if issue_url:
        links.append((f"GitHub issue #{incident.links.get(ISSUE_LINK, '?')}", issue_url))
    return links
