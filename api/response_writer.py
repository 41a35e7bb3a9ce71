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

from collections.abc import Iterable
from typing import NamedTuple

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from shared import kept


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
            self._start(message["status"], message.get("headers", []))
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

    def _start(self, status_code: int, app_headers: Iterable[tuple[bytes, bytes]]) -> None:
        """uvicorn's response start, but the head of a response of declared length is held, and
        the header lines are written by a plan made once for each sequence of header names."""
        self.response_started = True
        self.waiting_for_100_continue = False
        headers = self.default_headers + list(app_headers)
        if self.access_log:
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status_code,
            )
        names, values = zip(*headers, strict=True) if headers else ((), ())
        try:
            plan = _PLANS.get(names) or _plan(names)
        except TypeError:  # a name given as a bytearray: no key, so no plan kept
            plan = _plan(names, keep=False)
        # uvicorn's value check, made once over all the values (its pattern is a class of
        # characters, found in a concatenation if in any part), by deleting the bytes it allows:
        # a third of the pattern's cost, over the hundred-odd bytes of every answer's values.
        if b"".join(values).translate(None, _VALUE_BYTES):
            raise RuntimeError("Invalid HTTP header value.")
        has_connection_close = False
        for kind, index in plan.framing:  # what uvicorn reads of the headers, in their order
            value = values[index]
            if kind is _LENGTH:
                if self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
            elif kind is _ENCODING:
                if value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
            elif b"close" in [token.lower().strip() for token in value.split(b",")]:
                self.keep_alive = False
                has_connection_close = True
        content = [STATUS_LINE[status_code], plan.lines % values]
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


# Every byte uvicorn's HEADER_VALUE_RE allows in a header value (it matches one byte).
_VALUE_BYTES = bytes(byte for byte in range(256) if not HEADER_VALUE_RE.match(bytes((byte,))))

# The headers uvicorn reads as it writes them (by lower-case name).
_LENGTH, _ENCODING, _CONNECTION = "content-length", "transfer-encoding", "connection"
_FRAMING = {name.encode(): name for name in (_LENGTH, _ENCODING, _CONNECTION)}


class _Plan(NamedTuple):
    """How a head with a given sequence of header names is written: its header lines with a
    `%b` for each value in turn, and where the headers that frame the answer are."""

    lines: bytes
    framing: tuple[tuple[str, int], ...]  # (which, index in the sequence), in order


# By the header names of an answer, as given (the default headers' and then the app's): an app
# answers with a few such sequences over and over, and checking and lowering each name of every
# answer cost more than writing the rest of it.
_PLANS: dict[tuple[bytes, ...], _Plan] = {}
_PLANS_MAX = 512


def _plan(names: tuple[bytes, ...], *, keep: bool = True) -> _Plan:
    """The plan of a sequence of names, checked as uvicorn checks each (made once over all the
    names); kept for the next answer unless `keep` is false (names that cannot be a key)."""
    if HEADER_RE.search(b"".join(names)):
        raise RuntimeError("Invalid HTTP header name.")
    lowered = [bytes(name.lower()) for name in names]
    plan = _Plan(
        lines=b"".join(name.replace(b"%", b"%%") + b": %b\r\n" for name in lowered),
        framing=tuple(
            (_FRAMING[name], index) for index, name in enumerate(lowered) if name in _FRAMING
        ),
    )
    if keep:
        kept.keep(_PLANS, names, plan, limit=_PLANS_MAX)
    return plan
