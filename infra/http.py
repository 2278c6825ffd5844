"""Small helpers shared by the HTTP adapters (GitHub, Slack)."""

from __future__ import annotations


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (only the delta-seconds form; both APIs send that)."""
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None
