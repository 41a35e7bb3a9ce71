"""An answer's head and body leave in one write (api/response_writer.py), and every answer is the
bytes uvicorn's own cycle would have written, in whatever writes."""

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.server import ServerState

from api.http_server import BoundedHeadProtocol
from api.response_writer import OneWriteCycle

Message = dict[str, Any]


class RecordingTransport(asyncio.Transport):
    """What a cycle writes, write by write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class Outcome:
    """What a cycle did with a sequence of messages: its writes, the error it raised, its state."""

    def __init__(self, cycle_class: type[RequestResponseCycle], messages: list[Message], **kw: Any):
        self.transport = RecordingTransport()
        self.completed = 0
        cycle = cycle_class(
            scope={"type": "http", "method": kw.get("method", "GET"), "http_version": "1.1"},  # type: ignore[typeddict-item]
            transport=self.transport,
            flow=FlowControl(self.transport),
            logger=logging.getLogger("test"),
            access_logger=logging.getLogger("test.access"),
            access_log=False,
            default_headers=kw.get(
                "default_headers", [(b"date", b"Mon, 07 Dec 2026 12:00:00 GMT")]
            ),
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=kw.get("keep_alive", True),
            on_response=self._completed,
        )
        self.error: str | None = None
        for message in messages:
            if message["type"] == "client gone":
                cycle.disconnected = True
                continue
            try:
                asyncio.run(cycle.send(message))  # type: ignore[arg-type]
            except RuntimeError as exc:
                self.error = str(exc)
                break
        self.state = (
            cycle.response_started,
            cycle.response_complete,
            cycle.keep_alive,
            self.transport.closed,
            self.completed,
        )

    def _completed(self) -> None:
        self.completed += 1

    @property
    def sent(self) -> bytes:
        return b"".join(self.transport.writes)


def start(status: int = 200, *headers: tuple[bytes, bytes]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def body(content: bytes = b"", *, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": content, "more_body": more}


JSON = (b"content-type", b"application/json")


def length(n: int) -> tuple[bytes, bytes]:
    return (b"content-length", str(n).encode())


CASES: dict[str, tuple[list[Message], dict[str, Any]]] = {
    "202 with a body": (
        [start(202, length(7), JSON, (b"location", b"/p/1")), body(b'{"a":1}')],
        {},
    ),
    "body in pieces": ([start(200, length(6)), body(b"abc", more=True), body(b"def")], {}),
    "empty body": ([start(200, length(0)), body()], {}),
    "204 without length": ([start(204), body()], {}),
    "304 without length": ([start(304, (b"etag", b'"x"')), body()], {}),
    "chunked (no length)": ([start(200, JSON), body(b"data: 1\n\n", more=True), body()], {}),
    "chunked, declared": (
        [start(200, (b"transfer-encoding", b"chunked")), body(b"x", more=True), body(b"y")],
        {},
    ),
    "HEAD": ([start(200, length(7)), body()], {"method": "HEAD"}),
    "connection close by the app": (
        [start(200, length(2), (b"Connection", b"keep-alive, Close")), body(b"ok")],
        {},
    ),
    "connection close by the server": ([start(200, length(2)), body(b"ok")], {"keep_alive": False}),
    "upper-case names": ([start(200, (b"Content-Length", b"2"), (b"X-Id", b"7")), body(b"ok")], {}),
    "longer than declared": ([start(200, length(1)), body(b"ab")], {}),
    "shorter than declared": ([start(200, length(3)), body(b"ab")], {}),
    "invalid header name": ([start(200, length(2), (b"bad name", b"x")), body(b"ok")], {}),
    "invalid header value": ([start(200, length(2), (b"x-a", b"a\nb")), body(b"ok")], {}),
    "a second start": ([start(200, length(2)), start(200, length(2))], {}),
    "a body before the start": ([body(b"ok")], {}),
    "after the end": ([start(200, length(2)), body(b"ok"), body(b"more")], {}),
    "started, never finished": ([start(200, length(2))], {}),
    "client gone before the body": ([start(200, length(2)), {"type": "client gone"}, body()], {}),
    "length, then chunked": (
        [start(200, length(2), (b"Transfer-Encoding", b"Chunked")), body(b"ok", more=True), body()],
        {},
    ),
    "chunked, then length": (
        [start(200, (b"transfer-encoding", b"chunked"), length(2)), body(b"ok", more=True), body()],
        {},
    ),
    "two lengths": ([start(200, length(2), length(5)), body(b"ok")], {}),
    "transfer-encoding not chunked": (
        [start(200, (b"transfer-encoding", b"gzip"), length(2)), body(b"ok")],
        {},
    ),
    "connection without close": (
        [start(200, length(2), (b"connection", b"keep-alive")), body(b"ok")],
        {"keep_alive": False},
    ),
    "a percent sign in a name": ([start(200, (b"x-%s%d", b"%s"), length(2)), body(b"ok")], {}),
    "a name as a bytearray": (
        [start(200, (bytearray(b"X-A"), b"1"), length(2)), body(b"ok")],  # type: ignore[arg-type]
        {},
    ),
    "no header at all": ([start(200), body(b"ok")], {"default_headers": []}),
}
# A head held for its body is never written if the body never comes, or its client left.
HEAD_NEVER_WRITTEN = ("started, never finished", "client gone before the body")


@pytest.mark.parametrize("case", CASES)
def test_every_answer_is_what_uvicorn_writes_and_ends_the_same_way(case: str) -> None:
    messages, options = CASES[case]

    uvicorns = Outcome(RequestResponseCycle, messages, **options)

    # Twice: the second answer's head is written by the plan the first one left.
    for ours in (Outcome(OneWriteCycle, messages, **options) for _ in range(2)):
        if case in HEAD_NEVER_WRITTEN:
            assert ours.sent == b""
            assert uvicorns.sent.startswith(b"HTTP/1.1 200 OK\r\n")
        else:
            assert ours.sent == uvicorns.sent
        assert ours.error == uvicorns.error
        assert ours.state == uvicorns.state


def test_every_byte_of_a_header_value_is_judged_as_uvicorn_judges_it() -> None:
    """A value is checked by deleting the bytes uvicorn's pattern allows: each of the 256, in
    the middle of a value given after a valid one, is refused exactly where uvicorn refuses it."""
    refused = []
    for byte in range(256):
        messages = [start(200, length(2), (b"x-a", b"ok"), (b"x-b", b"a" + bytes((byte,)) + b"b"))]
        messages.append(body(b"ok"))
        uvicorns = Outcome(RequestResponseCycle, messages)
        ours = Outcome(OneWriteCycle, messages)
        assert (ours.sent, ours.error) == (uvicorns.sent, uvicorns.error), byte
        if ours.error is not None:
            refused.append(byte)

    assert refused == [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]


@pytest.mark.parametrize(
    "case",
    ["202 with a body", "empty body", "204 without length", "connection close by the server"],
)
def test_an_answer_of_declared_length_is_one_write(case: str) -> None:
    messages, options = CASES[case]

    ours = Outcome(OneWriteCycle, messages, **options)

    assert len(ours.transport.writes) == 1, ours.transport.writes
    assert ours.sent.startswith(b"HTTP/1.1 ")


def test_a_chunked_answer_has_its_head_written_before_its_first_piece() -> None:
    """A status event stream: the browser sees it open before the first event comes."""
    ours = Outcome(OneWriteCycle, [start(200, (b"content-type", b"text/event-stream"))])

    assert ours.transport.writes == [
        b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 12:00:00 GMT\r\n"
        b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    ]


def test_the_server_python_m_api_answers_each_request_in_one_write_and_arms_no_timer() -> None:
    """The protocol gives each request's cycle the one-write send, pipelined ones too; and an
    answer arms no keep-alive timer (the server's sweep closes an idle connection)."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Any) -> None:
        await receive()
        await send(start(200, length(2), JSON))
        await send(body(b"{}"))

    async def serve() -> tuple[list[bytes], object, float | None]:
        config = Config(app, lifespan="off", log_level="warning")
        protocol = BoundedHeadProtocol(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n" * 2)
        for _ in range(100):
            if len(transport.writes) >= 2:
                break
            await asyncio.sleep(0.01)
        timer, idle_since = protocol.timeout_keep_alive_task, protocol._idle_since
        protocol.connection_lost(None)
        return transport.writes, timer, idle_since

    writes, timer, idle_since = asyncio.run(serve())

    assert len(writes) == 2, writes
    for write in writes:
        head, _, content = write.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert content == b"{}"
    assert timer is None
    assert idle_since is not None


def test_the_protocol_gives_a_cycle_its_arguments_in_uvicorns_order() -> None:
    """api/http_server.py builds each cycle with its arguments by position (keywords cost each
    request more than the rest of the call): a uvicorn that reorders them fails here."""
    assert list(inspect.signature(RequestResponseCycle.__init__).parameters) == [
        "self",
        "scope",
        "transport",
        "flow",
        "logger",
        "access_logger",
        "access_log",
        "default_headers",
        "message_event",
        "expect_100_continue",
        "keep_alive",
        "on_response",
    ]
