"""Fast paths for the two requests a flash sale is made of: the purchase and the status poll.

A flash sale is thousands of identical, valid `POST /events/{id}/tickets/purchase` a second, then
as many `GET /purchases/{id}` polls, and on two cores the framework's per-request work (routing,
content-type parsing, the body's `json.loads` and dict validation, dependency solving, response
model serialization, exception and exit-stack layers) costs more CPU than the request itself. So
this middleware serves the unremarkable ones directly, through the same service and the same
error handlers:

- a purchase with a canonical event id, a plain `application/json` body of declared length within
  the limit that validates (pydantic straight from the JSON bytes), and at most one valid
  Idempotency-Key;
- a status poll with a canonical purchase id and no query string.

Everything else, including every purchase it would have to refuse, goes on to the FastAPI routes
(with the body already read replayed): the routes stay the one definition of the contract (their
documentation, their error answers), and this only ever answers what they would answer.
"""

import re
from collections.abc import Sequence
from uuid import UUID

from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import expected_error_response
from api.resources import Resources
from api.routes import purchases
from api.routes.purchases import PURCHASE_PATH, RETRY_AFTER_PENDING_S, STATUS_PATH
from shared.purchases.models import PurchaseCreate, PurchaseStatus
from shared.text import IdempotencyKey

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


PURCHASE = _pattern(PURCHASE_PATH, "event_id")
STATUS = _pattern(STATUS_PATH, "purchase_id")
# Set in the scope as the router would, so metrics label each request by its route template.
PURCHASE_ROUTE = _route(PURCHASE_PATH)
STATUS_ROUTE = _route(STATUS_PATH)

_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(IdempotencyKey)
_RETRY_AFTER = (b"retry-after", RETRY_AFTER_PENDING_S.encode())


class FastPaths:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            if method == "POST" and (match := PURCHASE.fullmatch(scope["path"])):
                await self._purchase(scope, receive, send, UUID(match[1]))
                return
            if (
                method == "GET"
                and not scope["query_string"]
                and (match := STATUS.fullmatch(scope["path"]))
            ):
                await self._status(scope, receive, send, UUID(match[1]))
                return
        await self.app(scope, receive, send)

    async def _purchase(self, scope: Scope, receive: Receive, send: Send, event_id: UUID) -> None:
        headers = self._plain_json_headers(scope)
        if headers is None:
            await self.app(scope, receive, send)
            return
        body, received = await _read_body(receive)
        if body is None:  # the client went away mid-body: the route answers that as ever
            await self.app(scope, _replay(received, receive), send)
            return
        try:
            request = PurchaseCreate.model_validate_json(body)
            key = headers.get(b"idempotency-key")
            idempotency_key = None if key is None else _IDEMPOTENCY_KEY.validate_python(key)
        except ValidationError:
            await self.app(scope, _replay(received, receive), send)
            return
        scope["route"] = PURCHASE_ROUTE
        service = _resources(scope).purchases
        try:
            accepted = await service.submit(event_id, request, idempotency_key=idempotency_key)
        except Exception as exc:
            await _answer_error(scope, receive, send, exc)
            return
        location = (b"location", accepted.status_url.encode())
        await _answer(send, 202, accepted, before=[location, _RETRY_AFTER])

    async def _status(self, scope: Scope, receive: Receive, send: Send, purchase_id: UUID) -> None:
        scope["route"] = STATUS_ROUTE
        try:
            purchase = await _resources(scope).purchases.status(purchase_id)
        except Exception as exc:
            await _answer_error(scope, receive, send, exc)
            return
        pending = purchase.status == PurchaseStatus.PENDING
        await _answer(send, 200, purchase, after=[_RETRY_AFTER] if pending else [])

    def _plain_json_headers(self, scope: Scope) -> dict[bytes, str] | None:
        """The headers that matter here, if the purchase is one the fast path serves: a body
        of declared length within the limit, sent as plain `application/json` (the route reads
        media types its own way; the unusual ones are left to it), none of those headers twice."""
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in (b"content-type", b"content-length", b"idempotency-key"):
                if name in headers:
                    return None
                headers[name] = value.decode("latin-1")
            elif name == b"transfer-encoding":
                return None
        length = headers.get(b"content-length", "")
        if not (length.isascii() and length.isdigit()) or int(length) > self.max_body_bytes:
            return None
        media_type = headers.get(b"content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return None
        return headers


def _resources(scope: Scope) -> Resources:
    resources: Resources = scope["app"].state.resources
    return resources


Headers = Sequence[tuple[bytes, bytes]]


async def _answer(
    send: Send, status: int, model: BaseModel, *, before: Headers = (), after: Headers = ()
) -> None:
    """Send `model` as JSON, with the headers where the route's response puts them: those it
    is built with before, those set on the injected Response after, the body's own between."""
    payload = model.model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *before,
                (b"content-length", str(len(payload)).encode()),
                (b"content-type", b"application/json"),
                *after,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _answer_error(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    response = expected_error_response(Request(scope), exc)
    if response is None:
        raise exc  # a bug: the server error middleware logs it and answers 500
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
    """`receive` for the route: the messages already read, in order, then the real stream."""
    pending = iter(received)

    async def replay() -> Message:
        return next(pending, None) or await receive()

    return replay
