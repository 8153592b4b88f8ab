"""A TCP relay to Redis that a test can cut and resume (a network link or server going away)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from tests.ports import release, reserve_port


class RedisProxy:
    """A TCP relay between one worker and Redis that a test can cut and resume.

    Cut: every relayed connection is aborted and new ones are dropped as soon as they
    connect, as when a network link or the Redis server goes away.
    """

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.path = parts.path
        self.up = True
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._port = 0  # reserved while listening (tests/ports.py)
        self._transports: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        self._port = reserve_port()  # not port 0: the kernel may offer a killed server's reserved one
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._port)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self.path}"

    def cut(self) -> None:
        self.up = False
        for transport in list(self._transports):
            transport.abort()

    def resume(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            release(self._port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = {writer.transport, upstream_writer.transport}
        self._transports |= pair
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        finally:
            self._transports -= pair
            for transport in pair:
                transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction until either side closes; then close the other too."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
