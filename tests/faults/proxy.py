"""A TCP proxy the tests control, to cut a service off mid-flood and bring it back."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. `cut()` drops every open connection and refuses
    new ones (as a dead server or a broken network would); `restore()` accepts again. `freeze()`
    holds every byte in both directions while connections stay open (a stalled server);
    `thaw()` lets them through again."""

    def __init__(self, target_host: str, target_port: int, *, reply_delay_s: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.reply_delay_s = reply_delay_s  # added to everything the server sends back
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.up = True
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.up = False
        for writer in list(self._writers):
            transport = writer.transport
            # Abort, not close: the peer sees a reset, like a crashed server.
            transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, upstream_writer})
        pipes = [
            asyncio.create_task(self._pipe(reader, upstream_writer)),
            asyncio.create_task(self._pipe(upstream_reader, writer, replies=True)),
        ]
        self._pipes.update(pipes)
        for pipe in pipes:
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if replies and self.reply_delay_s:  # read each time: a test may slow a server down
                    await asyncio.sleep(self.reply_delay_s)
                await self._flowing.wait()
                if not self.up:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@contextlib.asynccontextmanager
async def proxy_for(
    url: str, default_port: int, *, reply_delay_s: float = 0.0
) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(url)
    proxy = TcpProxy(
        parts.hostname or "127.0.0.1", parts.port or default_port, reply_delay_s=reply_delay_s
    )
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
