"""The raw-ASGI dispatch of the two requests a flash sale is made of: the purchase and the
status poll.

A flash sale is thousands of identical `POST /events/{id}/tickets/purchase` a second, then as many
`GET /purchases/{id}` polls, and on two cores the framework's per-request work (its middleware
layers, routing, content negotiation, dependency solving) costs more CPU than the request itself.
The app hands every HTTP request here first (api/main.py); the unremarkable ones are served by
calling exactly what the routes call, the functions of api/purchase_contract.py, and sending the
answer they return:

- a purchase with a canonical event id and a plain `application/json` body of declared length
  within the limit (other shapes are the request guard's and the route's to judge);
- a status poll with a canonical purchase id and no query string but `wait` (a long-poll);
- a status event stream with a canonical purchase id and no query string: thousands are held at
  once, and the middleware stack's frames and tasks would be kept by each for minutes.

What the middleware stack would add to those answers is done here too, once: the app's exception
handlers answer failures (looked up as Starlette looks them up, a bug logged and answered 500),
CORS headers are added (Starlette's own CORS logic), and the request is counted in
the metrics. Everything else goes through the whole app unchanged, with the body already read
replayed, and so does everything while `dependency_overrides` are set, since only the routes see
those.
"""

import contextlib
import functools
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from api import metrics, purchase_contract
from api.answers import Answer
from api.deps import purchase_service_of, settings_of, status_waiters_of
from api.errors import ProblemHandler
from api.guards import in_utf8
from api.routes import purchases
from api.status_stream import EventStream
from shared.kept import keep

if TYPE_CHECKING:
    from api.main import TicketingAPI

_HEX = "[0-9a-fA-F]"
_CANONICAL_UUID = "-".join(f"{_HEX}{{{n}}}" for n in (8, 4, 4, 4, 12))


def _pattern(path: str, parameter: str) -> re.Pattern[str]:
    return re.compile(re.escape(path).replace(rf"\{{{parameter}\}}", f"({_CANONICAL_UUID})"))


def _route(path: str) -> APIRoute:
    return next(
        route
        for route in purchases.router.routes
        if isinstance(route, APIRoute) and route.path == path
    )


PURCHASE = _pattern(purchase_contract.PURCHASE_PATH, "event_id")
STATUS = _pattern(purchase_contract.STATUS_PATH, "purchase_id")
EVENTS = _pattern(purchase_contract.STATUS_EVENTS_PATH, "purchase_id")
PURCHASE_ROUTE = _route(purchase_contract.PURCHASE_PATH)
STATUS_ROUTE = _route(purchase_contract.STATUS_PATH)
EVENTS_ROUTE = _route(purchase_contract.STATUS_EVENTS_PATH)

# The event ids of the last few thousand purchase paths, by path: a flash sale names one event
# over and over, and matching its path and parsing its id each time is a visible share of the
# request.
_EVENT_IDS: dict[str, UUID] = {}
_EVENT_IDS_MAX = 4096


def _purchase_of(path: str) -> UUID | None:
    """The event id of a purchase path (a canonical one), else None."""
    event_id = _EVENT_IDS.get(path)
    if event_id is None:
        match = PURCHASE.fullmatch(path)
        if match is None:
            return None
        event_id = keep(_EVENT_IDS, path, UUID(match[1]), limit=_EVENT_IDS_MAX)
    return event_id


def route_path(scope: Scope) -> str:
    """The path the router matches: without the app's mount point (root_path)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class FastPaths:
    def __init__(
        self, app: "TicketingAPI", *, max_body_bytes: int, cors_options: dict[str, Any]
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Starlette's CORS logic: its send wrapper adds the headers for each answer.
        self._cors = CORSMiddleware(self.app, **cors_options)
        self._without_origin = _cors_headers_without_origin(self._cors)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """What serves the request, to be awaited. A plain method rather than a coroutine: a
        held status request keeps every frame between its task and its wait, for minutes."""
        app = self.app
        if app.root_path:  # as FastAPI itself does, before anything reads the path
            scope["root_path"] = app.root_path
        if not app.dependency_overrides:
            method = scope["method"]
            if (
                method == "POST"
                and (event_id := _purchase_of(route_path(scope))) is not None
                and (headers := self._plain_json(scope)) is not None
            ):
                return self._purchase(scope, receive, send, event_id, b"origin" in headers)
            if (
                method == "GET"
                and _plain_status_query(scope["query_string"])
                and (match := STATUS.fullmatch(route_path(scope)))
            ):
                answer = purchase_contract.status(purchase_service_of(app), scope, UUID(match[1]))
                return self._serve(scope, receive, send, STATUS_ROUTE, answer, _has_origin(scope))
            if (
                method == "GET"
                and not scope["query_string"]
                and (match := EVENTS.fullmatch(route_path(scope)))
            ):
                settings = settings_of(app)
                stream = purchase_contract.status_events(
                    purchase_service_of(app),
                    status_waiters_of(app),
                    scope,
                    UUID(match[1]),
                    heartbeat_s=settings.status_heartbeat_s,
                    max_s=settings.status_stream_max_s,
                )
                return self._serve(scope, receive, send, EVENTS_ROUTE, stream, _has_origin(scope))
        return app.framework(scope, receive, send)

    async def _purchase(
        self, scope: Scope, receive: Receive, send: Send, event_id: UUID, has_origin: bool
    ) -> None:
        # The body is read here, not in a helper of its own: this frame is the one the
        # request's task resumes when the broker confirms, and each frame more costs per
        # purchase (it takes the place of `__call__`'s, which is not a coroutine).
        body, received = await _read_body(receive)
        receive = _replay(received, receive)
        if body is None:  # the client went away mid-body: the route answers
            await self.app.framework(scope, receive, send)
            return
        answer = purchase_contract.accept(purchase_service_of(self.app), scope, event_id, body)
        await self._serve(scope, receive, send, PURCHASE_ROUTE, answer, has_origin)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: APIRoute,
        answer: Awaitable[Answer | EventStream],
        has_origin: bool,
    ) -> None:
        """Answer with the contract's `answer` as the middleware stack would answer with a
        route: failures by the app's handlers, CORS headers by Starlette's CORS logic, a bug
        answered 500 and raised, and the request counted. (The contract's coroutine is awaited
        here rather than in a wrapper of its own: each frame between the request's task and the
        broker's confirm is resumed again when the confirm comes.)"""
        scope["app"] = self.app
        started = time.perf_counter()
        status = 500
        reply: Answer | EventStream | Response | None = None
        try:
            try:
                reply = await answer
            except Exception as exc:
                reply = await _error_response(scope, receive, exc)
            # Done with, but a finished coroutine keeps its frame's memory for as long as it
            # is referenced, and a stream is held for minutes.
            del answer
            status = _status_of(reply)
            await self._sending(scope, receive, send, reply, has_origin)
        except Exception as exc:
            if not (isinstance(reply, EventStream) and reply.started):
                # With CORS headers, as any answer: without them a page sees no 500, only
                # a failed fetch.
                bug = await _bug_response(scope, receive, exc)
                if bug is not None:
                    status = bug.status_code  # counted as answered, not as the reply that failed
                    await self._sending(scope, receive, send, bug, has_origin)
            raise  # (a stream already under way is cut short: its 200 is sent)
        finally:
            metrics.record(scope["method"], route.path, status, time.perf_counter() - started)

    def _sending(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        reply: Answer | EventStream | Response,
        has_origin: bool,
    ) -> Awaitable[None]:
        """What sends `reply` with the CORS headers due, to be awaited (a plain method, for the
        same reason as `__call__`)."""
        if not isinstance(reply, Response) and not has_origin:
            # Ours carry no header CORS would merge with: add what it adds without an Origin.
            extra = self._without_origin
        else:
            extra = ()
            send = functools.partial(
                self._cors.send, send=send, request_headers=Headers(scope=scope)
            )
        if isinstance(reply, Answer):
            return reply.send(send, extra=extra)
        if isinstance(reply, EventStream):
            return reply.send(receive, send, extra=extra)
        return reply(scope, receive, send)

    def _plain_json(self, scope: Scope) -> dict[bytes, bytes] | None:
        """The headers by name, if they are those of a body of declared length within the limit,
        sent as plain `application/json` (in UTF-8, uncompressed), with no header given twice:
        what the request guard passes as it is and the contract reads as the route would; else
        None. (A repeated header of any name leaves the request to them: one dict built in C
        tells that, where a loop over the headers in Python cost more.)"""
        given: list[tuple[bytes, bytes]] = scope["headers"]
        headers = dict(given)
        if len(headers) != len(given) or b"transfer-encoding" in headers:
            return None
        length = headers.get(b"content-length", b"")
        if not (length.isascii() and length.isdigit()) or int(length) > self.max_body_bytes:
            return None
        if b"content-encoding" in headers:  # the request guard judges it
            return None
        content_type = headers.get(b"content-type", b"")
        media_type, has_parameters, _ = content_type.partition(b";")
        if has_parameters and not in_utf8(content_type):
            return None
        return headers if media_type.strip().lower() == b"application/json" else None


def _status_of(reply: Answer | EventStream | Response) -> int:
    if isinstance(reply, Answer):
        return reply.status
    return 200 if isinstance(reply, EventStream) else reply.status_code


def _plain_status_query(query: bytes) -> bool:
    """No query, or only `wait` (a long-poll): what the status contract reads by itself. A
    long-poll held here costs its waiting request none of the middleware stack's frames."""
    return not query or (query.startswith(b"wait=") and b"&" not in query)


def _has_origin(scope: Scope) -> bool:
    for name, _ in scope["headers"]:  # noqa: SIM110 (a loop, not any(): no generator per request)
        if name == b"origin":
            return True
    return False


def _cors_headers_without_origin(cors: CORSMiddleware) -> tuple[tuple[bytes, bytes], ...]:
    """What Starlette's CORS logic adds to an answer to a request without an Origin (`Vary:
    Origin`, a cache hint), worked out once by running that logic on an empty answer, so the
    commonest answer needs no header parsing and rewriting of its own. Its send wrapper awaits
    nothing here, so one step of the coroutine runs it through."""
    message: Message = {"type": "http.response.start", "status": 200, "headers": []}

    async def keep(_: Message) -> None:
        return None

    step = cors.send(message, send=keep, request_headers=Headers(raw=[]))
    with contextlib.suppress(StopIteration):
        step.send(None)
    return tuple(message["headers"])


Handler = Callable[[Request, Exception], Any]


def _handler_for(scope: Scope, exc: Exception) -> Handler | None:
    """The app's handler for an expected `exc`, most specific type first, as Starlette's
    exception middleware finds it; None for a bug (only the catch-all would take it)."""
    handlers: dict[Any, Handler] = scope["app"].exception_handlers
    for kind in type(exc).__mro__:
        if kind is Exception:
            return None
        handler = handlers.get(kind)
        if handler is not None:
            return handler
    return None


async def _error_response(scope: Scope, receive: Receive, exc: Exception) -> Answer | Response:
    """The app's answer to an expected failure; a bug is raised on."""
    handler = _handler_for(scope, exc)
    if handler is None:
        raise exc
    if isinstance(handler, ProblemHandler):
        # The path of a request served here is plain (a fixed prefix and a canonical id): it
        # is what Starlette's request.url.path would give.
        return handler.answer(scope["path"], exc)
    response = handler(Request(scope, receive), exc)
    if inspect.isawaitable(response):
        response = await response
    assert isinstance(response, Response)
    return response


async def _bug_response(scope: Scope, receive: Receive, exc: Exception) -> Response | None:
    """What the server error middleware answers for a route: the catch-all handler's 500."""
    handler = scope["app"].exception_handlers.get(Exception)
    if handler is None:
        return None
    response = handler(Request(scope, receive), exc)
    if inspect.isawaitable(response):
        response = await response
    assert isinstance(response, Response)
    return response


async def _read_body(receive: Receive) -> tuple[bytes | None, list[Message]]:
    """The whole body (None if the client went away first) and the messages it came in.
    The server stops at the declared Content-Length, which was checked against the limit."""
    received: list[Message] = []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] == "http.disconnect":
            return None, received
        if not message.get("more_body", False):
            if len(received) == 1:  # the usual small body, in one piece
                body: bytes = message.get("body", b"")
                return body, received
            return b"".join(m.get("body", b"") for m in received), received


def _replay(received: list[Message], receive: Receive) -> Receive:
    """A receive that gives back what was already read, then reads on."""
    pending = iter(received)

    async def replay() -> Message:
        return next(pending, None) or await receive()

    return replay
