"""The floor under the status latency of a burst: a server that holds every status request and,
once released, answers them all in one tight loop, one prebuilt socket write each (no framework,
no database, no parsing beyond the request line). Driven by the client that measures the API
(bench/status_push.hold_waiters), it shows what the kernel and that client alone take to deliver
so many answers on this machine: no server can do better there.

    python -m bench.answer_floor PORT

- `GET /ready`: 200 at once.
- `GET /purchases/{id}/events`: a stream's head and its pending event at once; its decided
  event when released.
- any other GET: held; a decided status when released.
- `POST /release`: answers every held request, then itself with the time (`time.time()`) the
  answers began, which stands in for the decisions' commit.
"""

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import cast

# The bytes the API sends for a decided purchase (api/purchase_contract.status), give or take a
# few characters of ids and times.
DECIDED = (
    b'{"purchase_id":"b3b2a1c4-0f7e-8d5a-9c3b-2a1f0e9d8c7b",'
    b'"event_id":"5f0c6a9e-3b1d-4c2e-8f7a-6d5c4b3a2918","customer_id":"waiter-1","quantity":1,'
    b'"status":"confirmed","reason":null,"accepted_at":"2026-12-06T08:00:00.123456Z",'
    b'"processed_at":"2026-12-06T08:00:01.234567Z","hold_expires_at":null,'
    b'"confirmed_at":"2026-12-06T08:00:01.234567Z","cancelled_at":null,'
    b'"payment_reference":null,"queue":null}'
)
PENDING = DECIDED.replace(b'"confirmed"', b'"pending"', 1)
ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\ncontent-type: application/json\r\n"
    b'etag: "confirmed"\r\nvary: Origin\r\n\r\n%s' % (len(DECIDED), DECIDED)
)


def _chunk(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\nvary: Origin\r\ntransfer-encoding: chunked\r\n\r\n"
) + _chunk(b"id: pending\nevent: status\ndata: %s\n\n" % PENDING)
STREAM_DECIDED = _chunk(b"id: confirmed\nevent: status\ndata: %s\n\n" % DECIDED) + b"0\r\n\r\n"


@dataclass
class _Server:
    held: list[tuple[asyncio.Transport, bytes]] = field(default_factory=list)
    released: bool = False  # a request read after the release is answered at once


class _Held(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        # Each connection sends one request and no body but the release's (empty): its request
        # line is all this reads.
        self._received += data
        if b"\r\n" not in self._received:
            return
        method, path = self._received.split(b" ", 2)[:2]
        self._received = b""
        self._answer(method, path)

    def _answer(self, method: bytes, path: bytes) -> None:
        assert self._transport is not None
        if method == b"POST" and path == b"/release":
            self._release()
        elif path == b"/ready":
            self._transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        elif path.endswith(b"/events"):
            self._transport.write(STREAM_HEAD)
            self._hold(STREAM_DECIDED)
        else:
            self._hold(ANSWER)

    def _hold(self, answer: bytes) -> None:
        assert self._transport is not None
        if self._server.released:
            self._transport.write(answer)
        else:
            self._server.held.append((self._transport, answer))

    def _release(self) -> None:
        assert self._transport is not None
        began = time.time()
        self._server.released = True
        for transport, answer in self._server.held:
            transport.write(answer)
        self._server.held.clear()
        body = repr(began).encode()
        self._transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )


async def serve(port: int) -> None:
    state = _Server()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Held(state), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the benchmark installs it; the measure holds without, a little slower
        asyncio.run(serve(int(sys.argv[1])))
    else:
        uvloop.run(serve(int(sys.argv[1])))
