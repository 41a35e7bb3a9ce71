"""The HTTP/1.1 protocol `python -m api` serves with: uvicorn's httptools protocol, with the
request head (request line and headers) bounded.

httptools sets no bound of its own on a request head, and uvicorn's httptools protocol none
either (its `h11_max_incomplete_event_size` is h11's alone): a client that sends headers
without end has them all kept, concatenated piece by piece, until the process runs out of
memory. Past MAX_HEAD_BYTES the request is answered `431` and its connection closed.
"""

import asyncio
import logging
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.problems import problem

log = logging.getLogger(__name__)

# Far above what a browser sends (cookies included), far below what hurts a process.
MAX_HEAD_BYTES = 64 * 1024
# How long a refused request's connection is kept open after the answer, its input dropped.
LINGER_S = 1.0


class BoundedHeadProtocol(HttpToolsProtocol):
    """Counts what arrives while a request's head is incomplete, and refuses the request once
    that passes MAX_HEAD_BYTES. Counted by whole reads of the socket (the parser tells neither
    where a head begins in a read nor how long it is), so a head is refused at most one read
    past the bound, and a head that ends within a read is never refused whatever follows it
    there (a body, say): the memory a connection holds stays bounded, which is the point."""

    # What was read since the current head began, in whole reads (so the head is at most that
    # long); None while no head is being read (before the first request, during a body).
    _head_bytes: int | None = None
    _refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused head: read, so that the answer reaches the client
        super().data_received(data)
        # A head that this read did not complete (and that the parser did not refuse already).
        if self._head_bytes is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def _refuse(self) -> None:
        log.warning("request head over %d bytes refused", MAX_HEAD_BYTES)
        answer = problem(
            431,
            "Request header fields too large",
            f"The request line and headers must be at most {MAX_HEAD_BYTES} bytes in all.",
            instance=self._path(),
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            + b"content-type: application/problem+json\r\n"
            + b"content-length: %d\r\n" % len(answer.body)
            + b"connection: close\r\n\r\n"
            + answer.body
        )
        # Closed with the rest of the head unread, the connection would be reset, and the
        # client could lose the answer with it: the answer is followed by the end of what we
        # send, what the client still sends is read and dropped, and the connection closed a
        # moment later.
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    def _path(self) -> str:
        """The request's path (decoded, as the app's problems name it) if its request line was
        read whole, else `/`."""
        if not self.headers or len(self.url) > MAX_HEAD_BYTES:
            return "/"
        try:
            path: str = httptools.parse_url(self.url).path.decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            return "/"
        return unquote(path) if "%" in path else path
