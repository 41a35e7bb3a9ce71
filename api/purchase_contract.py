"""The HTTP contract of the two requests a flash sale is made of, defined once.

`accept` (POST /events/{event_id}/tickets/purchase) and `status` (GET /purchases/{purchase_id})
take the request as ASGI gives it (scope, raw body), validate it, call the service and return
the whole answer: status, headers and body. The FastAPI routes (api/routes/purchases.py) and the
raw-ASGI dispatch (api/fast_paths.py) both call them, so the two paths answer the same by
construction. Invalid input raises InvalidInput and domain failures their DomainError, which the
app's exception handlers (api/errors.py) answer for both paths alike.
"""

from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl
from uuid import UUID

import orjson
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.types import Scope

from api import status_stream
from api.answers import Answer
from api.errors import InvalidInput, unreadable_json
from api.json_body import read_json
from shared.purchases.changes import StatusWaiters
from shared.purchases.models import ConfirmRequest, Purchase, PurchaseCreate, PurchaseStatus
from shared.purchases.service import PurchaseService
from shared.text import IdempotencyKey

PURCHASE_PATH = "/events/{event_id}/tickets/purchase"
STATUS_PATH = "/purchases/{purchase_id}"
CONFIRM_PATH = "/purchases/{purchase_id}/confirm"
CANCEL_PATH = "/purchases/{purchase_id}/cancel"
STATUS_EVENTS_PATH = "/purchases/{purchase_id}/events"
IDEMPOTENCY_KEY = "Idempotency-Key"
# How soon a client should ask again about a pending purchase.
RETRY_AFTER_PENDING_S = "1"
# A status answer is never stored: a browser that kept one would revalidate the next identical
# request with its ETag in If-None-Match, which a long-poll reads as "wait until it changes".
_NOT_STORED = ("cache-control", "no-store")

Body = TypeVar("Body", bound=BaseModel)

_IDEMPOTENCY_KEY_HEADER = IDEMPOTENCY_KEY.lower().encode()
_IDEMPOTENCY_KEYS: TypeAdapter[str] = TypeAdapter(IdempotencyKey)
_PENDING = frozenset({PurchaseStatus.PENDING.value})
_PENDING_TEXT = PurchaseStatus.PENDING.value  # orjson reads an enum's value through Python
# Long-poll: how long a status request may be held, in seconds.
WaitSeconds = Annotated[float, Field(ge=0, le=30, allow_inf_nan=False)]
_WAIT: TypeAdapter[float] = TypeAdapter(WaitSeconds)


def status_url(scope: Scope, purchase_id: UUID) -> str:
    """Where the purchase's status is read, under the app's mount point (root_path)."""
    return f"{scope.get('root_path', '')}/purchases/{_uuid_text(purchase_id)}"


def _uuid_text(value: UUID) -> str:
    """str(value), as orjson writes it: UUID.__str__ formats in Python, at several times the
    cost, once per accepted purchase."""
    return orjson.dumps(value)[1:-1].decode()


def parse_body(model: type[Body], body: bytes) -> Body:
    """A request body: JSON as every route reads it (api/json_body.read_json: Python's json
    module, from UTF-8 alone, so NaN or a lone surrogate is a 422 here as on the routes with a
    body model), then the model.

    Validated straight from the bytes first, which is the same for every body both parsers read
    (these models have only strict integers and plain strings); only a body that fails to parse
    that way is read again by the json module, to tell malformed JSON from what it accepts."""
    if not body:
        raise InvalidInput([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if not any(error["type"] == "json_invalid" for error in exc.errors()):
            raise InvalidInput(_located("body", exc)) from None
    data = _json_of(body)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_located("body", exc)) from None


def _json_of(body: bytes) -> Any:
    """The body's JSON value, or the InvalidInput that answers a body json cannot read."""
    try:
        return read_json(body)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, too deep, too long a number
        raise unreadable_json(exc) from None


def idempotency_key(scope: Scope) -> str | None:
    """The Idempotency-Key header. Given more than once, it must be the same key each time:
    which of two keys the client meant cannot be told, and a guess could buy twice."""
    value: bytes | None = None
    for name, given in scope["headers"]:
        if name == _IDEMPOTENCY_KEY_HEADER:
            if value is None:
                value = given
            elif given != value:
                raise InvalidInput([_conflicting_keys()])
    if value is None:
        return None
    try:
        return _IDEMPOTENCY_KEYS.validate_python(value.decode("latin-1"))
    except ValidationError as exc:
        raise InvalidInput(_located("header", exc, IDEMPOTENCY_KEY)) from None


def _conflicting_keys() -> dict[str, Any]:
    return {
        "type": "conflicting_values",
        "loc": ("header", IDEMPOTENCY_KEY),
        "msg": "Given more than once with different values; send one key",
    }


async def accept(service: PurchaseService, scope: Scope, event_id: UUID, body: bytes) -> Answer:
    """Queue a purchase: 202 once the broker has confirmed it, with where to read its status."""
    request, key = _parse(scope, body)
    purchase_id = await service.submit(event_id, request, idempotency_key=key)
    url = status_url(scope, purchase_id)
    return Answer(
        202,
        accepted_body(purchase_id, event_id, request, url),
        headers=(("location", url), ("retry-after", RETRY_AFTER_PENDING_S)),
    )


def accepted_body(purchase_id: UUID, event_id: UUID, request: PurchaseCreate, url: str) -> bytes:
    """The 202's body: a PurchaseAccepted (the route's documented response model), written
    straight from its already validated fields (a test reads it back through the model)."""
    return orjson.dumps(
        {
            "purchase_id": purchase_id,
            "event_id": event_id,
            "customer_id": request.customer_id,
            "quantity": request.quantity,
            "status": _PENDING_TEXT,
            "status_url": url,
        }
    )


async def confirm(service: PurchaseService, scope: Scope, purchase_id: UUID, body: bytes) -> Answer:
    """Queue the confirmation of a held purchase: 202 once the broker has it."""
    request = parse_body(ConfirmRequest, body)
    await service.confirm(purchase_id, request.payment_reference)
    return _lifecycle_accepted(scope, purchase_id, "confirm")


async def cancel(service: PurchaseService, scope: Scope, purchase_id: UUID, body: bytes) -> Answer:
    """Queue the cancellation of a purchase: 202 once the broker has it. It reads nothing from
    a body, but one sent anyway must be JSON, as on every other route: malformed, it is a 400,
    never taken for a cancellation."""
    if body.strip(b" \t\r\n"):
        _json_of(body)
    await service.cancel(purchase_id)
    return _lifecycle_accepted(scope, purchase_id, "cancel")


def _lifecycle_accepted(scope: Scope, purchase_id: UUID, action: str) -> Answer:
    url = status_url(scope, purchase_id)
    body = orjson.dumps({"purchase_id": purchase_id, "action": action, "status_url": url})
    return Answer(202, body, headers=(("location", url), ("retry-after", RETRY_AFTER_PENDING_S)))


async def status(service: PurchaseService, scope: Scope, purchase_id: UUID) -> Answer:
    """A purchase's state, tagged with its status; while it is pending, when to ask again.

    With `?wait=S` (long-poll) the answer is held, up to S seconds, until the status is no longer
    the one the client has: `pending`, or the statuses named by `If-None-Match`."""
    wait_s = wait_seconds(scope)
    if wait_s is None:
        purchase: Purchase = await service.status(purchase_id)
    else:
        unlike = if_none_match(scope) or _PENDING
        # Followed here rather than through a helper: this frame is what each of thousands of
        # held requests keeps, and each frame more is a few hundred bytes each.
        with service.follow(purchase_id) as follower:
            changed = await follower.change(unlike=unlike, wait_s=wait_s)
        # Unchanged at the deadline: read again, so that a pending answer's wait ahead is now's.
        purchase = changed or await service.status(purchase_id)
    tag = ("etag", status_tag(purchase.status))
    pending = purchase.status == PurchaseStatus.PENDING
    return Answer(
        200,
        purchase.model_dump_json().encode(),
        headers=(
            (tag, _NOT_STORED, ("retry-after", RETRY_AFTER_PENDING_S))
            if pending
            else (tag, _NOT_STORED)
        ),
    )


async def status_events(
    service: PurchaseService,
    waiters: StatusWaiters[Purchase],
    scope: Scope,
    purchase_id: UUID,
    *,
    heartbeat_s: float,
    max_s: float,
) -> "Answer | status_stream.EventStream":
    """The purchase's status as server-sent events, from what the client has (`Last-Event-ID`)
    on; 204 when it already has a status that cannot change (EventSource then stops
    reconnecting). A refusal (404, 503) is raised before the stream starts."""
    stream = await status_stream.open_stream(
        service,
        waiters,
        purchase_id,
        last_event_id=_header(scope, b"last-event-id"),
        heartbeat_s=heartbeat_s,
        max_s=max_s,
    )
    if stream is None:
        return Answer(204, b"", media_type=None, headers=tuple(status_stream.HEADERS.items()))
    return stream


def _header(scope: Scope, name: bytes) -> str | None:
    """A header's first occurrence, as Starlette reads headers."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def status_tag(status: PurchaseStatus) -> str:
    """The entity tag of a status answer: the status itself, which never comes back once left
    (a purchase only moves forward), so it identifies what the client has seen."""
    return f'"{status.value}"'


def wait_seconds(scope: Scope) -> float | None:
    """The `wait` query parameter (its last occurrence), validated as the route documents it."""
    raw: str | None = None
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True):
        if name == "wait":
            raw = value
    if raw is None:
        return None
    try:
        return _WAIT.validate_python(raw)
    except ValidationError as exc:
        raise InvalidInput(_located("query", exc, "wait")) from None


def if_none_match(scope: Scope) -> frozenset[str]:
    """The statuses named by If-None-Match (`"held"`, `W/"held"`, a list of them)."""
    tags: set[str] = set()
    for name, value in scope["headers"]:
        if name == b"if-none-match":
            for tag in value.decode("latin-1").split(","):
                tag = tag.strip().removeprefix("W/").strip()
                if len(tag) >= 2 and tag[0] == tag[-1] == '"':
                    tags.add(tag[1:-1])
    return frozenset(tags)


def _parse(scope: Scope, body: bytes) -> tuple[PurchaseCreate, str | None]:
    """The body and the key, or every error found in them, as FastAPI reports parameters: a
    body that is not JSON alone (400), else the header's errors and then the body's (422)."""
    errors: list[Any] = []
    request: PurchaseCreate | None = None
    key: str | None = None
    try:
        request = parse_body(PurchaseCreate, body)
    except InvalidInput as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise
        errors.extend(exc.errors())
    try:
        key = idempotency_key(scope)
    except InvalidInput as exc:
        errors[:0] = exc.errors()
    if errors or request is None:
        raise InvalidInput(errors)
    return request, key


def _located(where: str, exc: ValidationError, *names: str) -> list[dict[str, Any]]:
    return [
        {**error, "loc": (where, *names, *error["loc"])}
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


# For the routes' OpenAPI documents: what `accept` and `confirm` read besides the path, described
# by the very types they validate with.
ACCEPT_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": IDEMPOTENCY_KEY,
            "in": "header",
            "required": False,
            "description": "Retrying with the same key (same customer, same event) returns the "
            "same purchase_id and never buys twice. Reusing it for another quantity is a 422. "
            "At most 255 bytes as sent (a key in UTF-8 is taken byte for byte), no control "
            "character.",
            "schema": _IDEMPOTENCY_KEYS.json_schema(),
        }
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PurchaseCreate.model_json_schema()}},
    },
}

CONFIRM_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ConfirmRequest.model_json_schema()}},
    },
}

STATUS_EVENTS_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "The `id` of the last event the client has (EventSource sends it when "
            "it reconnects): that status is not sent again, and if it can no longer change the "
            "answer is 204.",
            "schema": {"type": "string"},
        }
    ],
}

STATUS_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "Long-poll: hold the answer up to this many seconds (0 to 30) until "
            "the purchase is no longer pending, or no longer in the status named by "
            "If-None-Match. Without it, the answer is immediate.",
            "schema": _WAIT.json_schema(),
        },
        {
            "name": "If-None-Match",
            "in": "header",
            "required": False,
            "description": 'With `wait`: the status the client has, as its ETag (`"held"`); the '
            "answer is held until the status is another one.",
            "schema": {"type": "string"},
        },
    ],
}
