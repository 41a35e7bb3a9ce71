"""The HTTP/1.1 protocol `python -m api` serves with: uvicorn's httptools protocol, with the
request head (request line and headers) bounded, and the time a request takes to arrive.

httptools sets no bound of its own on a request head, and uvicorn's httptools protocol none
either (its `h11_max_incomplete_event_size` is h11's alone): a client that sends headers
without end has them all kept, concatenated piece by piece, until the process runs out of
memory. Past MAX_HEAD_BYTES the request is answered `431` and its connection closed, however
the head arrived: still arriving, or whole within a few reads of the socket (a request line
that long would otherwise be a 400: httptools cannot parse a URL past 64 KiB).

What httptools cannot parse at all uvicorn answers with a plain-text 400 of its own; here it is a
problem, as every other error of the API, sent after the answers of the requests before it on
the connection. These refusals never reach the app, so they are counted here, in the app's
request metrics (route `unrouted`).

Nor does uvicorn time a request's arrival: its keep-alive timeout only runs between two
requests, so a connection that sends nothing, half a head or a body a byte at a time is held
for good, and a client holding enough of them takes every file descriptor the process has.
A request must arrive whole within REQUEST_READ_TIMEOUT_S of its first byte (the first one,
of the connection's opening): an unfinished head is answered `408`, an unfinished body ends
its connection (the app sees its client leave), and a connection that never sent a byte is
closed. A request only notes when it began and when it has arrived; one sweep per server finds
those that took too long (a timer per request would cost each purchase of a flash sale more than
the rest of this module does). The same sweep closes a connection idle for longer than the
keep-alive timeout, in place of the timer uvicorn arms after every answer and cancels as the
next request comes.
"""

import asyncio
import contextvars
import logging
import re
import weakref
from typing import Any, NamedTuple, NoReturn
from urllib.parse import unquote

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from api import metrics
from api.problems import problem
from api.proxy_headers import TrustedProxies, apply_forwarded, trusts, unwrap
from api.response_writer import OneWriteCycle
from shared.kept import keep

log = logging.getLogger(__name__)

# Far above what a browser sends (cookies included), far below what hurts a process.
MAX_HEAD_BYTES = 64 * 1024
# How long a refused request's connection is kept open after the answer, its input dropped.
LINGER_S = 1.0
# Far longer than any client takes to send a head and a body of MAX_BODY_BYTES.
REQUEST_READ_TIMEOUT_S = 30.0
# The route label of the requests refused here, before any route could be chosen.
UNROUTED = "unrouted"


class _Refused(Exception):
    """Raised from the parser's callback once a head is judged, so that the parser stops there
    (uvicorn takes it for a request it cannot parse, and asks for a 400: send_400_response
    answers the refusal noted instead)."""


# A refusal of the protocol's own: status line, title, detail.
Refusal = tuple[bytes, str, str]

HEAD_TOO_LARGE: Refusal = (
    b"431 Request Header Fields Too Large",
    "Request header fields too large",
    f"The request line and headers must be at most {MAX_HEAD_BYTES} bytes in all.",
)
VERSION_NOT_SUPPORTED: Refusal = (
    b"505 HTTP Version Not Supported",
    "HTTP version not supported",
    "This server speaks HTTP/1.1 (and 1.0): send the request as HTTP/1.1.",
)
UPGRADE_WITH_BODY: Refusal = (
    b"400 Bad Request",
    "Bad request",
    "This server switches to no other protocol, and cannot read the body of a request that "
    "asks to (Upgrade): send it without Upgrade.",
)
NOT_HTTP: Refusal = (
    b"400 Bad Request",
    "Bad request",
    "The request could not be read as HTTP/1.1.",
)
BAD_HOST: Refusal = (
    b"400 Bad Request",
    "Bad request",
    "An HTTP/1.1 request must carry one Host header naming a valid host, with an optional port "
    "(RFC 9112, section 3.2).",
)
TRAILERS_TOO_LARGE: Refusal = (
    b"431 Request Header Fields Too Large",
    "Request header fields too large",
    f"The trailer fields must be at most {MAX_HEAD_BYTES} bytes in all.",
)

_HTTP_1 = frozenset({"1.1", "1.0"})
# The headers a trusted proxy's requests are read for (api/proxy_headers.py): a request with
# neither is left as it came, without a look at each of its headers again.
_FORWARDED = frozenset({b"x-forwarded-proto", b"x-forwarded-for"})
# A Host field's value (RFC 9112 §3.2, RFC 3986 §3.2.2): an IP literal or a registered name
# (unreserved characters, percent-encodings, sub-delimiters; an IPv4 address is one), and a port.
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?"
)


class BoundedHeadProtocol(HttpToolsProtocol):
    """Refuses a request whose head is longer than MAX_HEAD_BYTES.

    While a head is incomplete, what arrives is counted by whole reads of the socket (the
    parser tells neither where a head begins in a read nor how long it is; of the read it began
    in, what the parser has of it and the lines it is still reading), and the request is refused
    once that passes the bound: the memory a connection holds stays bounded. A head that ends
    within reads that could hold more than the bound is measured once complete, so one that
    arrived whole is refused too; a head in a small read, every request of a flash sale, is not
    measured at all.

    A refusal is the connection's last answer, sent after the answers of any requests before it
    on the connection (pipelined), never in their place."""

    # Slots, not attributes: uvicorn's protocol sets some thirty attributes of its own, and
    # these on top turned each connection's attribute dictionary from shared keys into one of
    # its own, about 1.3 KB more per connection (ten thousand are held by status streams).
    __slots__ = (
        "_arriving_since",
        "_began_in_this_read",
        "_beside_body",
        "_body_read",
        "_deferred",
        "_forwarded",
        "_head_bytes",
        "_host",
        "_hosts",
        "_idle_since",
        "_in_body",
        "_line_read",
        "_proxied",
        "_proxies",
        "_read",
        "_refusal",
        "_refused",
        "_running",
        "_valid_host",
    )

    # What was read since the current head began, in whole reads before the current one (so
    # the head is at most that plus the current read); None while no head is being read
    # (before the first request, during a body).
    _head_bytes: int | None
    _read: bytes  # the read being parsed (none between reads)
    _refusal: Refusal | None  # of the head just parsed, as the parser was stopped
    # Between a head read whole and the end of its request's message (its body, trailers).
    _in_body: bool
    # Bytes read since the body last delivered any: a trailer section (or chunk extensions)
    # past MAX_HEAD_BYTES is refused, as a head is.
    _beside_body: int
    _body_read: bool  # the read being parsed delivered some of the body
    # Whether the request line of the head being read has arrived whole (the parser delivers a
    # header only once the next one begins, so no header does not mean no whole line).
    _line_read: bool
    _began_in_this_read: bool  # the head being read began in the read being parsed
    # The Host fields of the head being read: how many, and the last one's value.
    _hosts: int
    _host: bytes
    _valid_host: bytes | None  # the last Host value found valid on this connection
    _refused: bool
    # A refusal waiting for the answers of the requests before it on the connection.
    _deferred: bytes | None
    # The request whose app runs now (its answer may be complete).
    _running: RequestResponseCycle | None
    # Loop time the request now arriving began (the connection's opening, for the first); None
    # once it has arrived whole.
    _arriving_since: float | None
    # Loop time the connection's last answer was complete, while nothing has arrived since.
    _idle_since: float | None
    # The trusted proxies of uvicorn's proxy-headers middleware, taken off the app and done here
    # (see api/proxy_headers.py); the same, if this connection's client is one of them, else None.
    _proxies: TrustedProxies | None
    _proxied: TrustedProxies | None
    _forwarded: bool  # the head being read has a header a trusted proxy's is read for

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.pipeline = _Pipeline()  # type: ignore[assignment]  # (see _Pipeline)
        self._head_bytes = None
        self._read = b""
        self._refusal = None
        self._in_body = self._body_read = self._line_read = False
        self._beside_body = 0
        self._began_in_this_read = self._refused = False
        self._hosts, self._host, self._valid_host = 0, b"", None
        self._forwarded = False
        self._deferred = None
        self._running = None
        self._arriving_since = self._idle_since = None
        self.app, self._proxies = unwrap(self.app)
        self._proxied = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        proxies = self._proxies
        self._proxied = proxies if proxies is not None and trusts(proxies, self.client) else None
        _lean(self.flow._is_writable_event)
        self._arriving_since = self.loop.time()
        _watch(self.loop, self.server_state, self.timeout_keep_alive)

    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        if self._refused:
            return  # the rest of a refused head: read, so that the answer reaches the client
        self._read = data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            pass  # what follows an upgrade request's head is dropped, as its connection closes
        if self._refused:  # by the parser's callbacks, as this read completed a head
            return
        # A head that this read did not complete.
        if self._head_bytes is not None and not self.transport.is_closing():
            if self._began_in_this_read:
                self._head_bytes = self._arrived_of_head(data)
                self._line_read = bool(self.url) and self.url not in _last_line(data)
            else:  # all of this read is the head's
                self._head_bytes += len(data)
                self._line_read = self._line_read or b"\n" in data
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse()
        self._began_in_this_read = False
        self._read = b""  # not kept by an idle connection
        if self._in_body and not self.transport.is_closing():
            self._count_beside_body(len(data))

    def _count_beside_body(self, read: int) -> None:
        """Count a read of a body being received: reads that deliver none of it (a trailer
        section, chunk extensions) may add up to MAX_HEAD_BYTES, as a head may."""
        if self._body_read:
            self._body_read, self._beside_body = False, 0
            return
        self._beside_body += read
        if self._beside_body > MAX_HEAD_BYTES:
            log.warning("trailer section over %d bytes refused", MAX_HEAD_BYTES)
            self._refuse_in_body(*TRAILERS_TOO_LARGE)

    def _arrived_of_head(self, data: bytes) -> int:
        """About how much of `data`, the read in which the head now arriving began, is that
        head's (the read may begin with requests before it): what the parser handed over (the
        request line, the headers), the line it holds back (it hands a header over once the next
        begins) and the line still arriving."""
        last = data.rfind(b"\n")
        held_back_from = data.rfind(b"\n", 0, max(last, 0)) + 1
        return min(len(data), self._head_length() + len(data) - held_back_from)

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        self._head_bytes = 0
        self._line_read = False
        self._began_in_this_read = True
        self._hosts = 0
        self._forwarded = False
        if self._arriving_since is None:
            self._arriving_since = self.loop.time()

    def on_header(self, name: bytes, value: bytes) -> None:
        # A field after a chunked body (a trailer) is dropped (RFC 9110 §6.5.1 allows it), where
        # uvicorn would add it to the request's headers, which the app has already judged, and
        # keep every one of them without bound.
        if self._head_bytes is not None:
            name = name.lower()
            value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace (RFC 9110 §5.5)
            if name == b"host":
                self._hosts += 1
                self._host = value
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_100_continue = True
            elif name in _FORWARDED:
                self._forwarded = True
            self.headers.append((name, value))
        elif name.lower() == b"connection" and b"close" in value.lower() and self.cycle is not None:
            # The one trailer that still counts: after `Connection: close` httptools drops
            # whatever the connection sends, so it must end with this request's answer.
            if self.cycle.response_complete:
                self.transport.close()
            else:
                self.cycle.keep_alive = False

    def on_headers_complete(self) -> None:
        could_be_over = (self._head_bytes or 0) + len(self._read) > MAX_HEAD_BYTES
        if could_be_over and self._head_length() > MAX_HEAD_BYTES:
            log.warning("request head over %d bytes refused", MAX_HEAD_BYTES)
            self._stop(HEAD_TOO_LARGE)
        self._head_bytes = None
        version = self.parser.get_http_version()
        if version not in _HTTP_1:
            # httptools reads HTTP/0.9 and HTTP/2.0 request lines as well; uvicorn would answer
            # them as HTTP/1.1.
            self._stop(VERSION_NOT_SUPPORTED)
        if not self._host_valid(version):
            self._stop(BAD_HOST)
        self._in_body, self._beside_body, self._body_read = True, 0, False
        if self._forwarded and self._proxied is not None:
            apply_forwarded(self._proxied, self.scope)
        if self.parser.should_upgrade():  # Connection: upgrade, and Upgrade (h2c, websocket)
            self._ignore_upgrade(version)
            return
        self._begin(version)

    def _begin(self, version: str) -> None:
        """Make the request of the head just read, and start its app or queue it behind the
        request being served (pipelined): uvicorn's own steps, but for the cycle's class (see
        api/response_writer.py), built as such rather than given its class afterwards. (Once
        built, an object given another class keeps its attributes in a dictionary of its own,
        where the interpreter's fast attribute access no longer finds them: that cost every
        request more than a tenth of what the raw-ASGI ceiling spends on one.)"""
        scope = self.scope
        scope["method"] = self.parser.get_method().decode("ascii")
        if version != "1.1":
            scope["http_version"] = version
        target = _TARGETS.get(self.url)
        if target is None or target.root_path != self.root_path:
            target = _target(self.url, self.root_path)
        scope["path"], scope["raw_path"], scope["query_string"] = target.parts
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        running = self.cycle
        # By position, in the order of uvicorn's signature: eleven keywords cost each request
        # more than the rest of the call.
        self.cycle = cycle = OneWriteCycle(
            scope,
            self.transport,
            self.flow,
            self.logger,
            self.access_logger,
            self.access_log,
            self.server_state.default_headers,
            _LeanEvent(),
            self.expect_100_continue,
            version != "1.0" and self.parser.should_keep_alive(),  # keep_alive
            self.on_response_complete,
        )
        if running is None or running.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def _host_valid(self, version: str) -> bool:
        """RFC 9112 §3.2: one Host field, with a valid value; an HTTP/1.0 request may have none.
        (The value is checked once per connection while it stays the same.)"""
        if self._hosts != 1:
            return self._hosts == 0 and version == "1.0"
        host = self._host
        if host == self._valid_host:
            return True
        if _HOST.fullmatch(host) is None:
            return False
        self._valid_host = host
        return True

    def _ignore_upgrade(self, version: str) -> None:
        """Serve a request that asks to switch protocols as a plain one (RFC 9110 §7.8 lets a
        server ignore Upgrade; this one switches to nothing), then close its connection:
        httptools reads nothing past such a head, taking the rest for the new protocol's. So a
        body it would never deliver is refused rather than read as none (curl --http2 sends
        one, with `Upgrade: h2c`)."""
        headers = dict(self.headers)
        length = headers.get(b"content-length", b"0").strip(b" \t")
        if b"transfer-encoding" in headers or not (length.isdigit() and int(length) == 0):
            self._stop(UPGRADE_WITH_BODY)
        self._begin(version)
        self.cycle.keep_alive = False

    def _stop(self, refusal: Refusal) -> NoReturn:
        """Stop the parser at the head just parsed, to be answered with `refusal`."""
        self._refusal = refusal
        raise _Refused

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # a head judged, not unparseable
            self._answer_and_close(*self._refusal)
        elif not self._in_body:  # a head: its request never began
            # uvicorn's own answer is plain text: a problem, as every other error of the API.
            self._answer_and_close(*NOT_HTTP)
        else:
            self._refuse_in_body(*NOT_HTTP)

    def _refuse_in_body(self, status_line: bytes, title: str, detail: str) -> None:
        """Refuse the request whose body (or trailer section) is being read."""
        cycle = self.cycle
        self._in_body = False
        if cycle is None:  # no request was made of any head on this connection yet
            self._answer_and_close(status_line, title, detail)
            return
        if cycle is not self._running:
            # Queued behind the request being served (pipelined): it never reaches the app,
            # and is answered in its turn.
            self.pipeline = _Pipeline(queued for queued in self.pipeline if queued[0] is not cycle)  # type: ignore[assignment]
            self._answer_and_close(status_line, title, detail)
            return
        # The request being served: answered now (the app, which waits for the rest of the
        # body, sees its client leave once the connection closes, and counts that answer);
        # only the connection ends if it was already answered.
        self._refused, self._arriving_since = True, None
        if cycle.response_started:
            self.transport.close()
        else:
            self._send_last(self._problem_bytes(status_line, title, detail))

    def _head_length(self) -> int:
        """The length of the head just parsed, as sent without optional whitespace (so never
        more than it was)."""
        request_line = len(self.url) + len(" HTTP/1.1\r\n") + len(self.parser.get_method()) + 1
        fields = sum(len(name) + len(value) + len(":\r\n") for name, value in self.headers)
        return request_line + fields + len("\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_read = True
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._arriving_since = None
        self._in_body = False
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    def check_times(self, now: float) -> None:
        """Close the connection if it has been idle for longer than the keep-alive timeout (as
        uvicorn would); refuse the request now arriving if it began more than
        REQUEST_READ_TIMEOUT_S before `now` (a loop time)."""
        idle_since = self._idle_since
        if idle_since is not None and now - idle_since > self.timeout_keep_alive:
            self._idle_since = None
            if not self.transport.is_closing():
                self.transport.close()
            return
        began_by = now - REQUEST_READ_TIMEOUT_S
        if self._arriving_since is None or self._arriving_since >= began_by:
            return
        if self.transport.is_closing():
            self._arriving_since = None
            return
        if self._head_bytes is None:
            # Nothing sent yet, or a body too slow: the app, if it has the request, sees its
            # client leave, as for any client that goes away mid-body.
            self._arriving_since = None
            self.transport.close()
            return
        log.warning("request not received within %.0f s; refused", REQUEST_READ_TIMEOUT_S)
        self._answer_and_close(
            b"408 Request Timeout",
            "Request timeout",
            f"The request must arrive within {REQUEST_READ_TIMEOUT_S:.0f} s of its first byte.",
        )

    def _refuse(self) -> None:
        log.warning("request head over %d bytes refused", MAX_HEAD_BYTES)
        self._answer_and_close(*HEAD_TOO_LARGE)

    def _answer_and_close(self, status_line: bytes, title: str, detail: str) -> None:
        """Answer a request the app never got with a problem, and close its connection: now,
        or once the requests before it on the connection are answered. It is counted in the
        request metrics as the app counts its own answers, under the route `unrouted`."""
        began = self._arriving_since
        seconds = 0.0 if began is None else self.loop.time() - began
        metrics.record(self._method(), UNROUTED, int(status_line[:3]), seconds)
        self._refused = True  # what the client sends from now on is read and dropped
        self._arriving_since = None
        raw = self._problem_bytes(status_line, title, detail)
        if self._answering():
            self._deferred = raw
        else:
            self._send_last(raw)

    def _problem_bytes(self, status_line: bytes, title: str, detail: str) -> bytes:
        """A whole answer, the last on its connection: the problem about the request now read."""
        answer = problem(int(status_line[:3]), title, detail, instance=self._path())
        return (
            b"HTTP/1.1 "
            + status_line
            + b"\r\n"
            + b"content-type: application/problem+json\r\n"
            + b"content-length: %d\r\n" % len(answer.body)
            + b"connection: close\r\n\r\n"
            + answer.body
        )

    def _answering(self) -> bool:
        """Whether a request before the refused one is still to be answered."""
        running = self._running
        return (running is not None and not running.response_complete) or bool(self.pipeline)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # The one place a request's app starts: the request being served is known here
        # (`cycle` is the last head read, which may be queued behind it).
        self._running = cycle
        if getattr(self.config, "reset_contextvars", False):  # uvicorn's option (0.55 on)
            task = self.loop.create_task(cycle.run_asgi(app), context=contextvars.Context())
        else:
            task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_response_complete(self) -> None:
        # uvicorn's, but for its keep-alive timer: a timer armed here and cancelled by the next
        # request cost each purchase of a flash sale more than a system call; the sweep closes
        # a connection left idle instead.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._head_bytes is None:
            # Idle from now, unless the next head has begun (pipelined behind this answer): that
            # one has until the 408 of check_times to arrive whole.
            self._idle_since = self.loop.time()
        if self._deferred is not None and not self._answering():
            raw, self._deferred = self._deferred, None
            if not self.transport.is_closing():
                self._send_last(raw)

    def _send_last(self, raw: bytes) -> None:
        self.transport.write(raw)
        # Closed with the rest of the head unread, the connection would be reset, and the
        # client could lose the answer with it: the answer is followed by the end of what we
        # send, what the client still sends is read and dropped, and the connection closed a
        # moment later.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    def _line_whole(self) -> bool:
        """Whether the request line of the head being read has arrived whole, also while the
        read it arrived in is being parsed (a parse error stops there)."""
        if self.headers or self._line_read:
            return True
        return (
            self._began_in_this_read and bool(self.url) and self.url not in _last_line(self._read)
        )

    def _method(self) -> str:
        """The request's method if its request line was read, else `unknown` (the parser
        reports a method, its first, before it has read one)."""
        if not self._line_whole():
            return "unknown"
        return str(self.parser.get_method().decode("ascii", "replace"))

    def _path(self) -> str:
        """The request's path (decoded, as the app's problems name it) if its request line was
        read whole, else `/`."""
        if not self._line_whole() or len(self.url) > MAX_HEAD_BYTES:
            return "/"
        try:
            raw: bytes | None = httptools.parse_url(self.url).path
        except httptools.HttpParserInvalidURLError:
            return "/"
        if not raw:  # an absolute form without a path (`http://host`)
            return "/"
        path = raw.decode("latin-1")
        return unquote(path) if "%" in path else path


class _Pipeline(list[tuple[RequestResponseCycle, ASGI3Application]]):
    """The requests queued behind the one being served, as uvicorn uses its deque of them
    (appendleft, pop, truth): a list takes 56 bytes while empty, as a connection's pipeline
    nearly always is, where a deque takes some 600 (ten thousand connections are held by status
    streams)."""

    __slots__ = ()

    def appendleft(self, item: tuple[RequestResponseCycle, ASGI3Application]) -> None:
        self.insert(0, item)


class _Target(NamedTuple):
    root_path: str
    parts: tuple[str, bytes, bytes]  # the scope's path, raw_path and query_string


# Request targets read as uvicorn reads them, by the target as sent: a flood of purchases sends
# one target per event over and over, and parsing and decoding each cost a request more than
# the rest of making its scope. Only short ones are kept, and the whole is dropped once full,
# so that targets that never repeat (status polls) cost little and hold little.
_TARGETS: dict[bytes, _Target] = {}
_TARGETS_MAX = 1024
_TARGET_KEPT_BYTES = 256


def _target(url: bytes, root_path: str) -> _Target:
    """uvicorn's reading of a request target into the scope, kept for the next request that
    sends the same one (under the same root path). An invalid target raises, as it does there."""
    parsed = httptools.parse_url(url)
    raw_path = parsed.path
    path = raw_path.decode("ascii")
    if "%" in path:
        path = unquote(path)
    target = _Target(
        root_path,
        (root_path + path, root_path.encode("ascii") + raw_path, parsed.query or b""),
    )
    if len(url) <= _TARGET_KEPT_BYTES:
        keep(_TARGETS, url, target, limit=_TARGETS_MAX)
    return target


class _LeanEvent(asyncio.Event):
    """An asyncio.Event with its waiters in a list (see _lean), made so from the start."""

    def __init__(self) -> None:
        self._waiters = []  # type: ignore[assignment]
        self._value = False


def _lean(event: asyncio.Event) -> None:
    """Keep `event`'s waiters in a list rather than asyncio's deque, for the same reason as
    _Pipeline: uvicorn keeps two events per connection (its flow control's and its request's),
    and each has at most one waiter. asyncio.Event only appends to, removes from, iterates and
    measures its waiters, as a list does."""
    event._waiters = []  # type: ignore[assignment]


def _last_line(data: bytes) -> bytes:
    """What follows the last line end of `data`: the line still arriving."""
    return data[data.rfind(b"\n") + 1 :]


# The servers whose connections a sweep is due for (one per server: a process may run several).
_WATCHED: "weakref.WeakSet[ServerState]" = weakref.WeakSet()


def _watch(loop: asyncio.AbstractEventLoop, state: ServerState, keep_alive_s: float) -> None:
    """Sweep `state`'s connections from now on, for as long as it has any."""
    if state not in _WATCHED:
        _WATCHED.add(state)
        # A fifth of the shorter bound: each is enforced within a fifth of itself.
        every_s = min(REQUEST_READ_TIMEOUT_S, keep_alive_s) / 5
        loop.call_later(every_s, _sweep, loop, state, every_s)


def _sweep(loop: asyncio.AbstractEventLoop, state: ServerState, every_s: float) -> None:
    """Close every connection idle for longer than its keep-alive timeout, and refuse every
    request that began arriving more than REQUEST_READ_TIMEOUT_S ago; again `every_s` later while
    connections are open, else once the next one opens. (A chain of timers, not a task: nothing
    to cancel when the server stops.)"""
    now = loop.time()
    for connection in list(state.connections):
        if isinstance(connection, BoundedHeadProtocol):
            connection.check_times(now)
    if state.connections:
        loop.call_later(every_s, _sweep, loop, state, every_s)
    else:
        _WATCHED.discard(state)
