"""A TCP proxy on loopback between incidentd and a real server, to give the network a property the
loopback interface lacks: latency (a database one network hop away) or a dropped connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Listens on ``127.0.0.1:port`` (a free port) and forwards every connection to ``host:port``.

    ``delay`` holds every chunk back that many seconds in each direction, so a request-response round
    trip takes ``2 * delay`` longer; chunks keep their order and many can be under way at once (the delay
    is latency, not a bandwidth limit). :meth:`drop` closes every open connection, as a failed network
    path would; new connections are accepted as before. Within ``async with proxy.outage():`` every
    connection is dropped and new ones are cut at once, until the block ends.
    """

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        self._target = (host, port)
        self.delay = delay
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusing = False

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, url: str) -> str:
        """``url`` (e.g. a DSN naming the target) pointed at the proxy instead."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        self._refusing = True
        self.drop()
        try:
            yield
        finally:
            self._refusing = False

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, server_writer))
        pipes = [
            asyncio.create_task(self._pipe(client_reader, server_writer)),
            asyncio.create_task(self._pipe(server_reader, client_writer)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for writer in (client_writer, server_writer):
                writer.transport.abort()
                self._writers.discard(writer)
            for task in pipes:
                task.cancel()
                self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    due, data = await queue.get()
                    if not data:
                        return
                    await asyncio.sleep(due - loop.time())
                    writer.write(data)
                    await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
            queue.put_nowait((0.0, b""))
            await delivering
        except ConnectionError:
            pass  # the other side went away (or drop()): the connection ends here
        finally:
            delivering.cancel()


@contextlib.asynccontextmanager
async def proxy_for(url: str, default_port: int, *, delay: float = 0.0) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the server ``url`` names (its host, and its port or ``default_port``)."""
    parts = urlsplit(url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port, delay=delay) as proxy:
        yield proxy
