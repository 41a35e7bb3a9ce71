"""The raw-ASGI dispatch of the two requests a flash sale is made of: the purchase and the
status poll.

A flash sale is thousands of identical `POST /events/{id}/tickets/purchase` a second, then as many
`GET /purchases/{id}` polls, and on two cores the framework's per-request work (routing, content
negotiation, dependency solving, the exception and exit-stack layers) costs more CPU than the
request itself. This middleware serves the unremarkable ones by calling exactly what the routes
call, the functions of api/purchase_contract.py, and sends the answer they return:

- a purchase with a canonical event id and a plain `application/json` body of declared length
  within the limit (other shapes are the request guard's and the route's to judge);
- a status poll with a canonical purchase id and no query string.

Everything else goes on to the app unchanged (with the body already read replayed), and so does
everything while `dependency_overrides` are set, since only the routes see those. Failures are
answered by the app's own exception handlers, looked up as Starlette looks them up.
"""

import inspect
import re
from collections.abc import Callable
from typing import Any
from uuid import UUID

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import purchase_contract
from api.deps import purchase_service_of
from api.routes import purchases

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
# Set in the scope as the router would, so metrics label each request by its route template.
PURCHASE_ROUTE = _route(purchase_contract.PURCHASE_PATH)
STATUS_ROUTE = _route(purchase_contract.STATUS_PATH)


def route_path(scope: Scope) -> str:
    """The path the router matches: without the app's mount point (root_path)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class FastPaths:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["app"].dependency_overrides:
            method = scope["method"]
            if method == "POST" and (match := PURCHASE.fullmatch(route_path(scope))):
                await self._purchase(scope, receive, send, UUID(match[1]))
                return
            if (
                method == "GET"
                and not scope["query_string"]
                and (match := STATUS.fullmatch(route_path(scope)))
            ):
                await self._status(scope, receive, send, UUID(match[1]))
                return
        await self.app(scope, receive, send)

    async def _purchase(self, scope: Scope, receive: Receive, send: Send, event_id: UUID) -> None:
        if not self._plain_json(scope):
            await self.app(scope, receive, send)
            return
        body, received = await _read_body(receive)
        if body is None:  # the client went away mid-body: the route answers that as ever
            await self.app(scope, _replay(received, receive), send)
            return
        scope["route"] = PURCHASE_ROUTE
        service = purchase_service_of(scope["app"])
        try:
            answer = await purchase_contract.accept(service, scope, event_id, body)
        except Exception as exc:
            await _fail(scope, _replay(received, receive), send, exc)
            return
        await answer.send(send)

    async def _status(self, scope: Scope, receive: Receive, send: Send, purchase_id: UUID) -> None:
        scope["route"] = STATUS_ROUTE
        service = purchase_service_of(scope["app"])
        try:
            answer = await purchase_contract.status(service, scope, purchase_id)
        except Exception as exc:
            await _fail(scope, receive, send, exc)
            return
        await answer.send(send)

    def _plain_json(self, scope: Scope) -> bool:
        """A body of declared length within the limit, sent as plain `application/json`, with
        neither header given twice: what the request guard passes as it is (it reads the last
        of each) and the contract reads as the route would."""
        seen: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in (b"content-type", b"content-length"):
                if name in seen:
                    return False
                seen[name] = value
            elif name == b"transfer-encoding":
                return False
        length = seen.get(b"content-length", b"")
        if not (length.isascii() and length.isdigit()) or int(length) > self.max_body_bytes:
            return False
        media_type = seen.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        return media_type == b"application/json"


Handler = Callable[[Request, Exception], Any]


def _handler_for(app: FastAPI, exc: Exception) -> Handler | None:
    """The app's handler for `exc`, most specific type first, as Starlette's exception
    middleware finds it; the catch-all is left to the server error middleware, as for a route."""
    handlers: dict[Any, Handler] = app.exception_handlers
    for kind in type(exc).__mro__:
        if kind is Exception:
            return None
        handler = handlers.get(kind)
        if handler is not None:
            return handler
    return None


async def _fail(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    handler = _handler_for(scope["app"], exc)
    if handler is None:
        raise exc  # a bug: the server error middleware logs it and answers 500
    response = handler(Request(scope, receive), exc)
    if inspect.isawaitable(response):
        response = await response
    await response(scope, receive, send)


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
            return b"".join(m.get("body", b"") for m in received), received


def _replay(received: list[Message], receive: Receive) -> Receive:
    """A receive that gives back what was already read, then reads on."""
    pending = iter(received)

    async def replay() -> Message:
        return next(pending, None) or await receive()

    return replay
