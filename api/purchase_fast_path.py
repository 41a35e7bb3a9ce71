"""The purchase route's fast path: a well-formed purchase is served straight from ASGI.

A flash sale is thousands of identical, valid `POST /events/{id}/tickets/purchase` requests a
second, and on two cores the framework's per-request work (routing, content-type parsing, the
body's `json.loads` and dict validation, dependency solving, exception and exit-stack layers)
costs more CPU than the purchase itself. So this middleware takes the requests that are
unremarkable — canonical event id, JSON body with a Content-Length within the limit, a body
that validates, at most one valid Idempotency-Key — validates the body in one pass (pydantic
straight from JSON bytes), calls the same PurchaseService, and writes the same 202. Everything
else, including every request it would have to refuse, goes on to the FastAPI route with its body
replayed: the route stays the one definition of the contract (its documentation, its error
answers), and this only ever answers what the route would answer.
"""

import re
from uuid import UUID

from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import expected_error_response
from api.resources import Resources
from api.routes import purchases
from api.routes.purchases import PURCHASE_PATH, RETRY_AFTER_PENDING_S
from shared.purchases.models import PurchaseCreate
from shared.text import IdempotencyKey

_HEX = "[0-9a-fA-F]"
_CANONICAL_UUID = "-".join(f"{_HEX}{{{n}}}" for n in (8, 4, 4, 4, 12))
PATH = re.compile(re.escape(PURCHASE_PATH).replace(r"\{event_id\}", f"({_CANONICAL_UUID})"))
# Set in the scope as the router would, so metrics label the request by its route template.
ROUTE = next(
    route
    for route in purchases.router.routes
    if isinstance(route, APIRoute) and route.path == PURCHASE_PATH
)

_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(IdempotencyKey)


class PurchaseFastPath:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
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
        await self._purchase(scope, receive, send, UUID(match[1]), request, idempotency_key)

    def _plain_json_headers(self, scope: Scope) -> dict[bytes, str] | None:
        """The headers that matter here, if the request is one the fast path serves: a body
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

    async def _purchase(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        event_id: UUID,
        request: PurchaseCreate,
        idempotency_key: str | None,
    ) -> None:
        scope["route"] = ROUTE
        resources: Resources = scope["app"].state.resources
        try:
            accepted = await resources.purchases.submit(
                event_id, request, idempotency_key=idempotency_key
            )
        except Exception as exc:
            response = expected_error_response(Request(scope), exc)
            if response is None:
                raise  # a bug: the server error middleware logs it and answers 500
            await response(scope, receive, send)
            return
        payload = accepted.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [  # as the route's Response writes them, in its order
                    (b"location", accepted.status_url.encode()),
                    (b"retry-after", RETRY_AFTER_PENDING_S.encode()),
                    (b"content-length", str(len(payload)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


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
