"""Secrets come from the environment (a SecretStr setting) or from a file (a mounted Kubernetes Secret)."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from common.redact import register_secret


def read_secret(value: SecretStr, file: Path | None) -> str:
    """The file's content (trailing newline stripped) when a file is configured, else the value.

    Read once, when the adapter is created: a missing file stops start-up with a clear error instead
    of failing every message later.
    """
    if file is None:
        return value.get_secret_value()
    try:
        secret = file.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {file}: {exc.strerror}") from None
    register_secret(secret)  # masked in every log line and stored error from now on (common/redact.py)
    return secret
