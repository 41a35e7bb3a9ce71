"""How an answer leaves the API: its head and body in one write to the socket.

uvicorn writes a response's head (status line and headers) as soon as the app starts it, and its
body in a second write: two system calls and two TCP segments for every answer, where nearly every
answer of this API (a purchase's 202, a status poll's 200, a problem) is one small body sent
right after its head. Here a head whose length is declared (Content-Length) is held until the
body's first piece and written with it; a chunked answer (a status event stream) has its head
written at once, as uvicorn does, so that a client sees it open before the first event.

Everything else is uvicorn's: the cycle class is uvicorn's own, given this `send`, and anything
but the plain case (a HEAD request, a client gone, a message out of order) goes to uvicorn's
`send` after the held head is written.
"""

from typing import cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, writing a response of declared length in one write.

    (Given to uvicorn's cycles by assigning their class as each starts: uvicorn builds them
    itself, in code of its own that a subclass would have to copy.)"""

    _head: bytes | None = None  # a response's head, held for its body

    async def send(self, message: ASGISendEvent) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if message["type"] == "http.response.body" and self._plain():
                self._send_body(head, message.get("body", b""), message.get("more_body", False))
                return
            if not self.disconnected:  # uvicorn writes nothing once its client is gone
                self.transport.write(head)
        elif (
            message["type"] == "http.response.start" and not self.response_started and self._plain()
        ):
            self._start(message)  # type: ignore[arg-type]
            return
        await super().send(message)

    def _plain(self) -> bool:
        """Nothing that uvicorn's send does beyond writing: no paused writes to wait for, a
        client still there, a method whose answer has a body."""
        return (
            not self.flow.write_paused
            and not self.disconnected
            and self.scope["method"] != "HEAD"
            and not self.response_complete
        )

    def _start(self, message: dict[str, object]) -> None:
        """uvicorn's response start, but the head of a response of declared length is held.
        (Its header checks, the same patterns, made once over all the names and once over all
        the values: each is a class of characters, found in a concatenation if in any part.)"""
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = cast(int, message["status"])
        headers = self.default_headers + list(
            cast("list[tuple[bytes, bytes]]", message.get("headers", []))
        )
        if self.access_log:
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status_code,
            )
        if HEADER_RE.search(b"".join(name for name, _ in headers)):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"".join(value for _, value in headers)):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [
                token.lower().strip() for token in value.split(b",")
            ]:
                self.keep_alive = False
                has_connection_close = True
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and status_code not in (204, 304):
            # Neither Content-Length nor Transfer-Encoding: uvicorn streams it, chunked.
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        if self.chunked_encoding:
            self.transport.write(b"".join(content))
        else:
            self._head = b"".join(content)

    def _send_body(self, head: bytes, body: bytes, more_body: bool) -> None:
        """The held head and the body's first piece, in one write; then as uvicorn completes a
        response."""
        if len(body) > self.expected_content_length:
            self.transport.write(head)
            raise RuntimeError("Response content longer than Content-Length")
        self.expected_content_length -= len(body)
        self.transport.write(head + body if body else head)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()
