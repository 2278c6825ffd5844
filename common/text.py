"""Text from events made safe for a terminal: what the human output of the CLI prints through."""

from __future__ import annotations

import re

# C0 and C1 controls (escape sequences, carriage returns, newlines that forge table rows, tabs that
# shift columns), DEL, line / paragraph separators and the bidirectional overrides that reorder text.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with every control character shown as an escape (``\\x1b``, ``\\x0a``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, str(value))
