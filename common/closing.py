"""The one shape of every adapter's ``open_…``: the adapter while the block runs, closed when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar


class Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@asynccontextmanager
async def closing(resource: C) -> AsyncIterator[C]:
    """``resource`` for the block, then ``await resource.close()`` however the block ends (unlike
    :func:`contextlib.aclosing`, which calls ``aclose``: the adapters here close with ``close``)."""
    try:
        yield resource
    finally:
        await resource.close()
