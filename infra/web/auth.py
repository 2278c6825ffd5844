"""Who may call: tokens from ``INCIDENTD_HTTP_TOKENS_FILE`` and a token bucket per caller.

The file holds one ``NAME:TOKEN`` or ``NAME:TOKEN:ROLE[,ROLE]`` per line (``#`` comments and blank lines
ignored). A caller presents the token as ``Authorization: Bearer TOKEN`` or, for senders that only do
basic auth, as HTTP basic with user NAME and password TOKEN. Every stored token is compared in constant
time (:func:`hmac.compare_digest`), all of them on every request, so neither the answer nor its timing
says which part failed. Nothing here ever logs a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("incidentd.http")

ROLES = frozenset({"ingest", "read", "write"})
MIN_TOKEN_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class TokensError(Exception):
    """The tokens file cannot be used; the message names the line, never its token."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name (logged, and later the actor) and its roles."""

    name: str
    roles: frozenset[str] = ROLES


ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    name: bytes
    token: bytes


def parse_tokens(text: str, source: str = "tokens file") -> list[_Entry]:
    entries: list[_Entry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        where = f"{source} line {number}"
        if len(parts) not in (2, 3):
            raise TokensError(f"{where}: expected NAME:TOKEN or NAME:TOKEN:ROLE[,ROLE]")
        name, token = parts[0].strip(), parts[1].strip()
        if not _NAME.match(name):
            raise TokensError(f"{where}: the name must be 1-64 of A-Z a-z 0-9 _ . @ -")
        if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
            raise TokensError(
                f"{where} ({name}): the token must be at least {MIN_TOKEN_LENGTH} printable ASCII "
                "characters without spaces"
            )
        roles = frozenset(r.strip() for r in parts[2].split(",") if r.strip()) if len(parts) == 3 else ROLES
        if not roles or roles - ROLES:
            raise TokensError(f"{where} ({name}): roles must be among {', '.join(sorted(ROLES))}")
        if any(e.principal.name == name for e in entries):
            raise TokensError(f"{where}: the name {name!r} appears twice")
        if any(hmac.compare_digest(e.token, token.encode()) for e in entries):
            raise TokensError(f"{where} ({name}): the same token is given to another name")
        entries.append(_Entry(Principal(name, roles), name.encode(), token.encode()))
    return entries


class Tokens:
    """The tokens file, re-read when it changes (checked every ``interval`` seconds) and on demand
    (SIGHUP). A file that no longer parses leaves the previous tokens in force and logs why."""

    def __init__(self, path: Path, entries: Iterable[_Entry], stamp: tuple[int, ...]) -> None:
        self.path = path
        self._entries = list(entries)
        self._stamp = stamp

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """Read the file, or raise TokensError (the process refuses to start)."""
        stamp, entries = cls._read(path)
        if not entries:
            raise TokensError(f"{path} holds no tokens")
        return cls(path, entries, stamp)

    @property
    def names(self) -> list[str]:
        return [e.principal.name for e in self._entries]

    @staticmethod
    def _read(path: Path) -> tuple[tuple[int, ...], list[_Entry]]:
        try:
            stat = path.stat()
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokensError(f"cannot read tokens file {path}: {exc.__class__.__name__}") from None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino), parse_tokens(text, str(path))

    def _stamp_now(self) -> tuple[int, ...] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``); True when new tokens are in force."""
        if not force and self._stamp_now() in (None, self._stamp):
            return False
        try:
            stamp, entries = self._read(self.path)
            if not entries:
                raise TokensError(f"{self.path} holds no tokens")
        except TokensError as exc:
            log.error("http.tokens_reload_failed", reason=str(exc), kept=len(self._entries))
            return False
        self._entries, self._stamp = entries, stamp
        log.info("http.tokens_reloaded", names=self.names)
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload()

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller an ``Authorization`` header names, or None (missing, malformed or wrong)."""
        name, token = _credentials(authorization or "")
        found: Principal | None = None
        for entry in self._entries:  # no early exit: the time taken does not depend on the match
            token_ok = hmac.compare_digest(entry.token, token)
            name_ok = name is None or hmac.compare_digest(entry.name, name)
            if token_ok and name_ok:
                found = entry.principal
        return found


def _credentials(header: str) -> tuple[bytes | None, bytes]:
    """(name or None for a bearer token, token); (None, b"") when the header is not usable."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return None, value.encode("utf-8", "replace")
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None, b""
        user, sep, password = decoded.partition(":")
        if sep and user and password:
            return user.encode(), password.encode()
    return None, b""


@dataclass
class RateLimiter:
    """A token bucket per caller: ``rate`` requests per second on average, ``burst`` at once. ``rate``
    0 disables the limit."""

    rate: float
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def admit(self, key: str) -> float:
        """0 when the request may go ahead (and takes a token), else seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        level, since = self._buckets.get(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - since) * self.rate)
        if level >= 1.0:
            self._buckets[key] = (level - 1.0, now)
            return 0.0
        self._buckets[key] = (level, now)
        return (1.0 - level) / self.rate


class FailureLimiter:
    """Failed authentications per peer address: a bucket of ``burst`` failures refilled at ``rate`` per
    second. While a peer's bucket is empty it is :meth:`blocked` (answered 429 before any token is
    checked), so a guesser learns nothing more, and learns it slowly. ``rate`` 0 disables the limit.

    At most ``max_peers`` addresses are remembered; past that, the ones whose bucket has refilled are
    forgotten (they are indistinguishable from new ones), so a spray of addresses cannot grow it."""

    def __init__(self, rate: float, burst: int, max_peers: int = 10_000) -> None:
        self.rate, self.burst, self._max_peers = rate, float(burst), max_peers
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, peer: str, now: float) -> float:
        level, since = self._buckets.get(peer, (self.burst, now))
        return min(self.burst, level + (now - since) * self.rate)

    def blocked(self, peer: str) -> float:
        """0 when ``peer`` may try; else the seconds until it may try again."""
        if self.rate <= 0 or peer not in self._buckets:
            return 0.0
        level = self._level(peer, time.monotonic())
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate

    def failed(self, peer: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        if peer not in self._buckets and len(self._buckets) >= self._max_peers:
            self._forget_refilled(now)
        self._buckets[peer] = (max(0.0, self._level(peer, now) - 1.0), now)

    def _forget_refilled(self, now: float) -> None:
        full = [p for p in self._buckets if self._level(p, now) >= self.burst]
        for peer in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[peer]


def retry_after(seconds: float) -> str:
    """A Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))
