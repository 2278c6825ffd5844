"""The tokens file's rules and the token bucket, without a server (pure functions and a fake clock are
enough here; the HTTP behaviour is proved in test_http.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from infra.web.auth import ROLES, RateLimiter, Tokens, TokensError, parse_tokens

GOOD = (
    "alertmanager:0123456789abcdef0123\n"
    "viewer:fedcba9876543210fedc:read\n"
    "# a comment\n\n"
    "ops:abcdefabcdefabcdef:ingest,write\n"
)


def test_names_roles_and_comments() -> None:
    """Lines without roles get all three; roles are a comma list; comments and blank lines are skipped."""
    entries = {e.principal.name: e.principal.roles for e in parse_tokens(GOOD)}
    assert entries == {"alertmanager": ROLES, "viewer": {"read"}, "ops": {"ingest", "write"}}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("alertmanager\n", "line 1: expected NAME:TOKEN"),
        ("a:b:c:d\n", "line 1: expected NAME:TOKEN"),
        ("# c\nshort:tooshort\n", "line 2 (short): the token must be at least 16"),
        ("bad name:0123456789abcdef0123\n", "line 1: the name must be"),
        ("x:0123456789abcdef0123:admin\n", "line 1 (x): roles must be among"),
        ("x:0123456789abcdef0123\nx:abcdefabcdefabcdefab\n", "line 2: the name 'x' appears twice"),
        ("x:0123456789abcdef0123\ny:0123456789abcdef0123\n", "line 2 (y): the same token"),
    ],
)
def test_a_bad_line_is_refused_by_number_without_its_token(text: str, says: str) -> None:
    """Each broken rule names the line (and the name), never the token."""
    with pytest.raises(TokensError) as caught:
        parse_tokens(text, "tokens")
    assert says in str(caught.value)
    assert "0123456789abcdef0123" not in str(caught.value) and "tooshort" not in str(caught.value)


def test_bearer_and_basic_match_only_the_exact_pair(tmp_path: Path) -> None:
    """Bearer needs the token; basic needs the token under its own name; anything else is no one."""
    path = tmp_path / "tokens"
    path.write_text(GOOD)
    tokens = Tokens.load(path)

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert tokens.authenticate("Bearer fedcba9876543210fedc").name == "viewer"  # type: ignore[union-attr]
    assert tokens.authenticate(basic("viewer", "fedcba9876543210fedc")).name == "viewer"  # type: ignore[union-attr]
    for header in (None, "", "Bearer", "Bearer fedcba9876543210fed", basic("ops", "fedcba9876543210fedc"),
                   "Basic not-base64!", "Digest fedcba9876543210fedc"):  # fmt: skip
        assert tokens.authenticate(header) is None


def test_the_bucket_refills_at_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of 3 passes, the 4th waits 1/rate; after that long one more passes; rate 0 never waits."""
    now = [100.0]
    monkeypatch.setattr("infra.web.auth.time.monotonic", lambda: now[0])
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.admit("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("a") == pytest.approx(0.5)
    assert limiter.admit("b") == 0.0
    now[0] += 0.5
    assert limiter.admit("a") == 0.0
    assert RateLimiter(rate=0, burst=1).admit("a") == 0.0
