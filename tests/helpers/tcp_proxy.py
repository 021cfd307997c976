"""A controllable TCP forwarder for outage tests: stop it, pause it, or cut its connections."""

from __future__ import annotations

import asyncio
import contextlib
import random
from types import TracebackType

_CHUNK = 64 * 1024


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target, with switches that simulate network failures.

    - stop(): refuse new connections and reset open ones (database down).
    - start(): listen again on the same port (database back).
    - kill_connections(): reset open connections but keep accepting (a network blip).
    - pause()/resume(): accept and hold traffic without forwarding it (a black hole),
      which is what makes clients hang unless they have timeouts.
    - latency: each forwarded chunk waits up to this many seconds (order is kept).
    - source: the loopback address (127.0.0.2, …) it connects to the target from, so the
      target sees another peer host.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        latency: float = 0.0,
        source: str | None = None,
    ) -> None:
        """Prepare a proxy to target_host:target_port; call start() to listen."""
        self.target_host = target_host
        self.target_port = target_port
        self.latency = latency
        self.source = source
        self.port = 0
        self.client_chunks = 0
        self.accepted = 0
        """Connections accepted so far (paused or not)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return "127.0.0.1"

    async def start(self) -> None:
        """Listen (on a free port the first time, on the same port after a stop)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.kill_connections()

    async def kill_connections(self) -> None:
        """Reset every open connection; new ones are still accepted if listening."""
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def pause(self) -> None:
        """Hold all traffic (open and new connections) without forwarding or closing."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward held and new traffic again."""
        self._flowing.set()

    def url(self, database_url: str) -> str:
        """Return database_url with its host:port replaced by this proxy's address."""
        scheme, rest = database_url.split("://", 1)
        authority, slash, path = rest.partition("/")
        userinfo, at, _ = authority.rpartition("@")
        return f"{scheme}://{userinfo}{at}{self.host}:{self.port}{slash}{path}"

    async def __aenter__(self) -> TcpProxy:
        """Start listening."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop and reset everything."""
        self.resume()
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # kill_connections cancels this inner task, never the server's own
        # callback task: Python 3.11 reports a cancelled callback as an error.
        self.accepted += 1
        forward = asyncio.create_task(self._forward(reader, writer))
        self._tasks.add(forward)
        try:
            await asyncio.wait([forward])
        finally:
            self._tasks.discard(forward)
            if not forward.done():
                forward.cancel()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host,
                self.target_port,
                local_addr=None if self.source is None else (self.source, 0),
            )
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pump(reader, upstream_writer, count=True),
                self._pump(upstream_reader, writer, count=False),
            )
        except OSError:
            pass
        finally:
            for each in (writer, upstream_writer):
                if each is not None:
                    self._writers.discard(each)
                    each.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                await self._flowing.wait()
                if self.latency:
                    await asyncio.sleep(random.uniform(0, self.latency))
                if count:
                    self.client_chunks += 1
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                writer.transport.abort()
