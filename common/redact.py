"""Secrets out of every text incidentd logs or stores (log lines, dead-letter reasons, timeline notes).

Two nets, because neither is enough alone:

* the values themselves: every secret setting (and every secret read from a file) is registered with
  :func:`register_secret` when it is loaded, and any occurrence of it is replaced;
* the shapes of secrets, for values incidentd never saw as settings (a token in a client library's error,
  a URL in an exception from a proxy): the password of a URL with credentials, Slack webhook paths,
  GitHub and Slack tokens, ``Authorization`` values and ``token=``-style query parameters.

What is left visible is enough to tell which endpoint was meant (``amqp://guest:***@mq:5672/``,
``https://hooks.slack.com/services/***``), never enough to use it.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import urlsplit

MASK = "***"

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*):[^\s@/'\"]*@"), rf"\g<head>:{MASK}@"),
    # Slack incoming webhooks and workflow triggers, with or without a scheme, on any host (stand-ins).
    (re.compile(r"(?P<head>/(?:services|workflows|triggers)/)[A-Za-z0-9_/-]+"), rf"\g<head>{MASK}"),
    # GitHub tokens (classic and fine-grained), Slack tokens.
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{20,})"), MASK),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{8,}|\bxapp-[A-Za-z0-9-]{8,}"), MASK),
    # Authorization header values and credentials in query strings.
    (
        re.compile(
            r"(?i)(?P<head>\b(?:authorization|proxy-authorization)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+(?:\s+[^\s'\",}]+)?"
        ),
        rf"\g<head>{MASK}",
    ),
    (re.compile(r"(?i)(?P<head>\b(?:bearer|token)\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\g<head>{MASK}"),
    (
        re.compile(
            r"(?i)(?P<head>[?&](?:access_token|token|api_key|apikey|key|password|secret|sig|signature)=)[^&\s'\"#]+"
        ),
        rf"\g<head>{MASK}",
    ),
]
# A cheap test before the patterns: most log values contain none of these.
_SUSPECT = re.compile(
    r"://|@|/services/|/workflows/|/triggers/|gh[pousr]_|github_pat_|xox|xapp-|(?i:authorization|bearer|token|key=|password|secret|sig)"
)

_secrets: set[str] = set()
_MIN_LENGTH = 8


def register_secret(value: str | None) -> None:
    """Replace ``value`` wherever it appears from now on (and, for a URL, its password on its own)."""
    # A value this short ("guest") is too likely to be an ordinary word; masking it would garble lines
    # (URLs are still masked by shape).
    if not value or len(value) < _MIN_LENGTH:
        return
    _secrets.add(value)
    try:
        password = urlsplit(value).password
    except ValueError:
        password = None
    if password and len(password) >= _MIN_LENGTH:
        _secrets.add(password)
    redact.cache_clear()


# Cached: most logged strings (event names, reasons during an outage) repeat, and a hit costs a dict
# lookup instead of a regular-expression scan. Cleared when a secret is registered.
@functools.lru_cache(maxsize=4096)
def redact(text: str) -> str:
    """``text`` with every registered secret and every secret-shaped part masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if _SUSPECT.search(text) is None:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def describe(exc: BaseException) -> str:
    """One line: the exception's type and message (its cause's when it has none), secrets masked."""
    text = str(exc) or (str(exc.__cause__) if exc.__cause__ else "")
    text = " ".join(text.split())  # one line, whatever the library put in it
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
