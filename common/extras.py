"""Optional client libraries are pip extras (``pip install 'incidentd[pubsub]'``). A setting that needs
one is checked when the settings load, so a missing extra stops start-up with one line naming it, not
with an ImportError from deep inside the first connect."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

# extra -> the modules it installs (import names). The pip names are in pyproject.toml.
EXTRAS: dict[str, tuple[str, ...]] = {
    "rabbitmq": ("aio_pika",),
    "pubsub": ("google.cloud.pubsub_v1",),
    "postgres": ("asyncpg",),
    "aws": ("aioboto3",),
    "kubernetes": ("kubernetes_asyncio",),
    "clickhouse": ("asynch",),
    "github": ("gidgethub",),
    "ai": ("bm25s", "Stemmer"),
}


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a parent package is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent: google.cloud without google-cloud-pubsub's namespace
        return False


def installed(extra: str) -> bool:
    return all(_importable(module) for module in EXTRAS[extra])


def missing_extras(needs: Iterable[tuple[str, str]]) -> list[str]:
    """One line per (setting, extra) pair whose extra is not installed."""
    return [
        f"{setting} needs the {extra} extra: pip install 'incidentd[{extra}]'"
        for setting, extra in needs
        if not installed(extra)
    ]
