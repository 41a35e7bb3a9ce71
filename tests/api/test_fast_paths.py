"""The raw-ASGI dispatch and the FastAPI routes answer the same.

Both call the functions of api/purchase_contract.py, so they agree by construction; these tests
guard the two adapters around them. Each purchase is sent twice: once with a Content-Length
(which the dispatch serves) and once streamed in chunks without one (which it always hands to the
route); each status poll once plain and once with a query string (which the route ignores and the
dispatch leaves to it). Both answers must be the same, headers compared as a set, whatever the
body, the headers or the state. A test also pins the route's parameters: a new one must be passed
on by the dispatch too.
"""

import json
import random
import re
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest
from fastapi.routing import APIRoute
from prometheus_client import REGISTRY
from starlette.types import Message, Receive, Scope, Send

from api import answers
from api.deps import get_purchase_service
from api.fast_paths import EVENTS_ROUTE, PURCHASE_ROUTE, STATUS_ROUTE, FastPaths
from api.main import create_app
from api.purchase_contract import PURCHASE_PATH
from shared.events.service import EventService
from shared.purchases.ids import PurchaseIds
from shared.purchases.service import PurchaseService, StatusFollower
from shared.settings import Settings
from tests.api.helpers import record_purchase
from tests.factories import create_event, event_body, purchase
from tests.fuzzing import examples, seed

Answer = tuple[int, Any, list[tuple[str, str]]]


def _chunks(body: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    return stream


_RETRY = re.compile(rb"retry: \d{4}")


def _normalize(response: httpx.Response) -> Answer:
    """What must match: status, body, and every header (in any order: HTTP gives their order no
    meaning). A purchase id is random unless derived from an Idempotency-Key, so a 202 without a
    key blanks it (same length, so the Content-Length still compares); so is an event's
    reconnection delay (always four digits)."""
    body: Any = _RETRY.sub(b"retry: <ms>", response.content)
    headers = sorted(response.headers.multi_items())
    if response.status_code == 202 and "idempotency-key" not in response.request.headers:
        purchase_id = response.json()["purchase_id"]
        body = body.replace(purchase_id.encode(), b"<id>")
        headers = [(name, value.replace(purchase_id, "<id>")) for name, value in headers]
    return response.status_code, body, headers


async def both_ways(
    api: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str | bytes]
) -> tuple[Answer, Answer]:
    raw = [
        (name.encode(), value if isinstance(value, bytes) else value.encode())
        for name, value in headers.items()
    ]
    sized = await api.post(path, content=body, headers=raw)
    streamed = await api.post(path, content=_chunks(body)(), headers=raw)
    assert "content-length" not in streamed.request.headers  # so only the route can answer it
    return _normalize(sized), _normalize(streamed)


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


GOOD = {"customer_id": "customer-1", "quantity": 2}
JSON_HEADER: dict[str, str | bytes] = {"Content-Type": "application/json"}

BODIES: list[tuple[str, bytes]] = [
    ("valid", _json(GOOD)),
    ("valid, spaced and reordered", b' {\n "quantity" : 2 , "customer_id":"customer-1" } '),
    ("unicode customer", _json({"customer_id": "Zoë 🎟", "quantity": 1})),
    ("escaped unicode", b'{"customer_id": "\\u00e9t\\u00e9", "quantity": 1}'),
    ("most tickets allowed", _json({"customer_id": "c", "quantity": 4})),
    ("too many for the event", _json({"customer_id": "c", "quantity": 5})),
    ("quantity 0", _json({"customer_id": "c", "quantity": 0})),
    ("quantity negative", _json({"customer_id": "c", "quantity": -1})),
    ("quantity huge", b'{"customer_id": "c", "quantity": 100000000000000000000000}'),
    ("quantity float", b'{"customer_id": "c", "quantity": 2.0}'),
    ("quantity exponent", b'{"customer_id": "c", "quantity": 2e0}'),
    ("quantity string", _json({"customer_id": "c", "quantity": "2"})),
    ("quantity bool", _json({"customer_id": "c", "quantity": True})),
    ("quantity null", _json({"customer_id": "c", "quantity": None})),
    ("quantity NaN", b'{"customer_id": "c", "quantity": NaN}'),
    ("quantity missing", _json({"customer_id": "c"})),
    ("customer missing", _json({"quantity": 1})),
    ("customer empty", _json({"customer_id": "", "quantity": 1})),
    ("customer too long", _json({"customer_id": "x" * 101, "quantity": 1})),
    ("customer longest", _json({"customer_id": "x" * 100, "quantity": 1})),
    ("customer number", _json({"customer_id": 42, "quantity": 1})),
    ("customer NUL", b'{"customer_id": "a\\u0000b", "quantity": 1}'),
    ("customer newline", b'{"customer_id": "a\\nb", "quantity": 1}'),
    ("customer lone surrogate", b'{"customer_id": "a\\ud800b", "quantity": 1}'),
    ("customer surrogate pair", b'{"customer_id": "a\\ud83c\\udf9fb", "quantity": 1}'),
    ("extra field", _json({**GOOD, "price": 10})),
    ("duplicate key", b'{"customer_id": "a", "customer_id": "b", "quantity": 1}'),
    ("duplicate key, bad then good", b'{"quantity": 0, "customer_id": "a", "quantity": 1}'),
    ("empty object", b"{}"),
    ("array", _json([GOOD])),
    ("string", b'"customer-1"'),
    ("null", b"null"),
    ("empty", b""),
    ("whitespace", b"   "),
    ("truncated", _json(GOOD)[:-3]),
    ("trailing garbage", _json(GOOD) + b" x"),
    ("two objects", _json(GOOD) + _json(GOOD)),
    ("trailing comma", b'{"customer_id": "c", "quantity": 1,}'),
    ("single quotes", b"{'customer_id': 'c', 'quantity': 1}"),
    ("byte order mark", b"\xef\xbb\xbf" + _json(GOOD)),
    ("latin-1 bytes", b'{"customer_id": "caf\xe9", "quantity": 1}'),
    ("invalid utf-8", b'{"customer_id": "\xff\xfe", "quantity": 1}'),
    # JSON is UTF-8: Python's json module would read these from their first bytes.
    ("utf-16-le", _json(GOOD).decode().encode("utf-16-le")),
    ("utf-16 with its mark", _json(GOOD).decode().encode("utf-16")),
    ("utf-32-be", _json(GOOD).decode().encode("utf-32-be")),
    ("deep nesting", b"[" * 5000 + b"]" * 5000),
]


@pytest.mark.parametrize(("case", "body"), BODIES, ids=[case for case, _ in BODIES])
async def test_fast_path_answers_each_body_as_the_route_does(
    api: httpx.AsyncClient, case: str, body: bytes
) -> None:
    event = await create_event(api, max_tickets_per_purchase=4)
    path = f"/events/{event['id']}/tickets/purchase"

    sized, streamed = await both_ways(api, path, body, {"Content-Type": "application/json"})

    assert sized == streamed, case


HEADERS: list[tuple[str, dict[str, str | bytes]]] = [
    ("json with charset", {"Content-Type": "application/json; charset=utf-8"}),
    ("json in capitals", {"Content-Type": "Application/JSON"}),
    ("json suffix", {"Content-Type": "application/merge-patch+json"}),
    ("two slashes", {"Content-Type": "application/x/y+json"}),
    ("vendor with two slashes", {"Content-Type": "application/vnd.a/b+json"}),
    ("json with spaces", {"Content-Type": " application/json ; charset=utf-8"}),
    ("json, charset quoted in capitals", {"Content-Type": 'application/json; charset="UTF-8"'}),
    ("json in latin-1", {"Content-Type": "application/json; charset=iso-8859-1"}),
    ("json, charset utf8", {"Content-Type": "application/json; charset=utf8"}),
    ("json, charset us-ascii", {"Content-Type": "application/json; charset=us-ascii"}),
    ("json, another parameter", {"Content-Type": "application/json; profile=x"}),
    ("gzip", {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
    ("identity coding", {"Content-Type": "application/json", "Content-Encoding": "identity"}),
    ("browser, allowed origin", {"Content-Type": "application/json", "Origin": "https://x.test"}),
    ("form", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("text", {"Content-Type": "text/plain"}),
    ("no content type", {}),
    ("idempotency key", {"Content-Type": "application/json", "Idempotency-Key": "k-1"}),
    ("idempotency key empty", {"Content-Type": "application/json", "Idempotency-Key": ""}),
    ("idempotency key long", {"Content-Type": "application/json", "Idempotency-Key": "k" * 256}),
    (
        "idempotency key control char",
        {"Content-Type": "application/json", "Idempotency-Key": "a\x01b"},
    ),
    (
        "idempotency key latin-1",
        {"Content-Type": "application/json", "Idempotency-Key": "clé".encode("latin-1")},
    ),
]


@pytest.mark.parametrize(("case", "headers"), HEADERS, ids=[case for case, _ in HEADERS])
async def test_fast_path_answers_each_header_variant_as_the_route_does(
    api: httpx.AsyncClient, case: str, headers: dict[str, str | bytes]
) -> None:
    event = await create_event(api)
    path = f"/events/{event['id']}/tickets/purchase"

    sized, streamed = await both_ways(api, path, _json(GOOD), headers)

    assert sized == streamed, case


async def test_fast_path_answers_event_states_and_paths_as_the_route_does(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    sold_out = await create_event(api)
    await db.execute("UPDATE events SET available_tickets = 0 WHERE id = $1", UUID(sold_out["id"]))
    event = await create_event(api)
    event_id = event["id"]
    paths = [
        f"/events/{uuid4()}/tickets/purchase",  # no such event: 404
        f"/events/{sold_out['id']}/tickets/purchase",  # sold out: 409
        f"/events/{event_id.upper()}/tickets/purchase",  # not canonical: the route's to parse
        f"/events/{event_id.replace('-', '')}/tickets/purchase",
        "/events/not-a-uuid/tickets/purchase",
        f"/events/{event_id}/tickets/purchase?unknown=1",
    ]
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    statuses = set()
    for path in paths:
        sized, streamed = await both_ways(api, path, _json(GOOD), headers)
        assert sized == streamed, path
        statuses.add(sized[0])
    assert statuses == {202, 404, 409, 422}, statuses


def _mutations(seed: int, count: int) -> list[bytes]:
    """Bodies near a valid one: values swapped for other JSON types, keys dropped or renamed,
    bytes flipped. Seeded, so a failure names a body that can be replayed."""
    rng = random.Random(seed)
    values: list[object] = [
        0,
        1,
        4,
        5,
        101,
        -1,
        2**63,
        1.5,
        "1",
        "",
        "x" * 120,
        None,
        True,
        [],
        {},
        "é\u0000",
    ]
    bodies: list[bytes] = []
    for _ in range(count):
        body: dict[str, object] = dict(GOOD)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(["customer_id", "quantity", "extra"])
            action = rng.random()
            if action < 0.6:
                body[key] = rng.choice(values)
            elif action < 0.8:
                body.pop(key, None)
            else:
                body[key.upper()] = body.pop(key, 1)
        raw = bytearray(json.dumps(body).encode())
        if rng.random() < 0.2 and raw:
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        bodies.append(bytes(raw))
    return bodies


@pytest.mark.fuzz
async def test_fast_path_answers_mutated_bodies_as_the_route_does(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api, max_tickets_per_purchase=4)
    path = f"/events/{event['id']}/tickets/purchase"
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    statuses: set[int] = set()
    for body in _mutations(seed=seed(20261126), count=examples(300)):
        sized, streamed = await both_ways(api, path, body, headers)
        assert sized == streamed, body
        statuses.add(sized[0])
    assert statuses >= {202, 400, 422}, statuses  # the mutations reached every kind of answer


def requests_reaching(route: APIRoute, monkeypatch: pytest.MonkeyPatch) -> list[Scope]:
    """The scopes of the requests that reach `route` from now on (the fast paths skip it)."""
    reached: list[Scope] = []
    handle = route.handle

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope)
        await handle(scope, receive, send)

    monkeypatch.setattr(route, "handle", counting)
    return reached


async def test_plain_json_purchases_skip_the_route_and_other_shapes_reach_it(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached = requests_reaching(PURCHASE_ROUTE, monkeypatch)
    event = await create_event(api)
    path = f"/events/{event['id']}/tickets/purchase"

    served = await api.post(path, json=GOOD)
    keyed = await api.post(path, json=GOOD, headers={"Idempotency-Key": "fast-1"})
    refused = await api.post(path, json={**GOOD, "quantity": 0})
    streamed = await api.post(
        path, content=_chunks(_json(GOOD))(), headers={"Content-Type": "application/json"}
    )

    statuses = [r.status_code for r in (served, keyed, refused, streamed)]
    assert statuses == [202, 202, 422, 202]
    assert [scope["path"] for scope in reached] == [path], (
        "only the request without a Content-Length reached the route"
    )


async def test_the_dispatch_steps_aside_while_dependencies_are_overridden(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings)
    reached = requests_reaching(PURCHASE_ROUTE, monkeypatch)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            event = await create_event(api)
            real = app.state.resources.purchases
            calls: list[UUID] = []

            class Recording:
                async def submit(self, event_id: UUID, *args: Any, **kwargs: Any) -> UUID:
                    calls.append(event_id)
                    purchase_id: UUID = await real.submit(event_id, *args, **kwargs)
                    return purchase_id

            app.dependency_overrides[get_purchase_service] = Recording
            response = await api.post(f"/events/{event['id']}/tickets/purchase", json=GOOD)

    assert response.status_code == 202
    assert calls == [UUID(event["id"])], "the override was bypassed"
    assert len(reached) == 1


async def test_the_dispatch_honours_the_apps_root_path(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mounted under /tickets (a proxy's prefix), the dispatch still serves the purchase, and
    the status URL it answers lies under the prefix, as the route's does."""
    app = create_app(settings)
    reached = requests_reaching(PURCHASE_ROUTE, monkeypatch)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, root_path="/tickets")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            event = await create_event(api)
            path = f"/tickets/events/{event['id']}/tickets/purchase"
            sized, streamed = await both_ways(api, path, _json(GOOD), JSON_HEADER)
            served = await api.post(path, json=GOOD)
            status = await api.get(served.json()["status_url"])
            created = await api.post("/tickets/events", json=event_body())

    assert sized == streamed
    assert sized[0] == 202
    assert served.json()["status_url"].startswith("/tickets/purchases/")
    assert served.headers["location"] == served.json()["status_url"]
    assert status.status_code == 200
    assert len(reached) == 1, "only the streamed purchase reached the route"
    assert created.headers["location"] == f"/tickets/events/{created.json()['id']}"


def test_the_purchase_routes_take_only_what_the_dispatch_passes_on() -> None:
    """The dispatch calls the contract with the path's id, the scope and the body, and nothing
    else. A parameter added to a route (a query, a header, a dependency) would reach the route
    and silently not the dispatch: this names the file to update."""
    expected = {
        PURCHASE_ROUTE.path: ({"event_id"}, {"request", "purchases"}),
        STATUS_ROUTE.path: ({"purchase_id"}, {"request", "purchases"}),
        EVENTS_ROUTE.path: ({"purchase_id"}, {"request", "purchases", "waiters", "settings"}),
    }
    for route in (PURCHASE_ROUTE, STATUS_ROUTE, EVENTS_ROUTE):
        dependant = route.dependant
        path_params = {param.name for param in dependant.path_params}
        others = {
            *(param.name for param in dependant.query_params),
            *(param.name for param in dependant.header_params),
            *(param.name for param in dependant.cookie_params),
            *(param.name for param in dependant.body_params),
        }
        injected = {dependency.name for dependency in dependant.dependencies}
        special = {name for name in ("request",) if dependant.request_param_name == name}
        found = (path_params, injected | special, others)
        assert found == (*expected[route.path], set()), (
            f"the parameters of {route.path} changed to {found}: update api/fast_paths.py (the "
            "raw-ASGI dispatch) to pass them to api/purchase_contract.py as the route does, then "
            "this test"
        )


async def test_fast_path_answers_a_broker_outage_as_the_route_does(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            event = await create_event(api)
            await app.state.resources.publisher.close()  # the broker channel is gone
            path = f"/events/{event['id']}/tickets/purchase"

            sized, streamed = await both_ways(
                api, path, _json(GOOD), {"Content-Type": "application/json"}
            )

    assert sized == streamed
    assert sized[0] == 503


async def test_fast_path_requests_are_counted_under_the_route_template(
    api: httpx.AsyncClient,
) -> None:
    def served() -> float:
        labels = {"method": "POST", "route": PURCHASE_PATH, "status": "202"}
        return REGISTRY.get_sample_value("ticketing_http_requests_total", labels) or 0.0

    event = await create_event(api)
    before = served()

    response = await api.post(f"/events/{event['id']}/tickets/purchase", json=GOOD)

    assert response.status_code == 202
    assert served() == before + 1


class _Route:
    """Stands in for the framework behind the fast path: records what reaches it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            self.messages.append(message)
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _scope(content_length: bytes) -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": f"/events/{uuid4()}/tickets/purchase",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", content_length)],
    }


async def _run(scope: Scope, incoming: list[Message]) -> tuple[_Route, list[Message]]:
    route, sent, stream = _Route(), [], iter(incoming)

    async def receive() -> Message:
        return next(stream)

    async def send(message: Message) -> None:
        sent.append(message)

    app = SimpleNamespace(dependency_overrides={}, root_path="", framework=route)
    await FastPaths(app, max_body_bytes=1024, cors_options={})(scope, receive, send)  # type: ignore[arg-type]
    return route, sent


async def test_client_gone_mid_body_is_handed_to_the_route_with_what_arrived() -> None:
    part = {"type": "http.request", "body": b'{"customer_id": "c', "more_body": True}
    gone = {"type": "http.disconnect"}

    route, sent = await _run(_scope(b"40"), [part, gone])

    assert route.messages == [part, gone], "the route sees the stream as the client sent it"
    assert sent[0]["status"] == 400


async def test_content_length_that_is_not_ascii_digits_is_left_to_the_route() -> None:
    body = {"type": "http.request", "body": _json(GOOD), "more_body": False}

    route, _ = await _run(_scope("²".encode("latin-1")), [body])

    assert route.messages == [body], "the fast path did not touch the request"


async def test_status_fast_path_answers_every_kind_of_purchase_as_the_route_does(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings
) -> None:
    event = await create_event(api)
    accepted_here = (await purchase(api, event["id"], quantity=2)).json()["purchase_id"]
    issued_elsewhere = PurchaseIds(settings.purchase_id_secret).new()  # pending, details unknown
    decided = PurchaseIds(settings.purchase_id_secret).new()
    await record_purchase(db, purchase_id=decided, event_id=event["id"], quantity=3)
    ids = [accepted_here, str(issued_elsewhere), str(decided)]
    paths = [
        *(f"/purchases/{purchase_id}" for purchase_id in ids),
        f"/purchases/{uuid4()}",  # never issued: 404
        f"/purchases/{accepted_here.upper()}",  # not canonical: the route's to parse
        f"/purchases/{accepted_here.replace('-', '')}",
        "/purchases/not-a-uuid",
    ]
    statuses = []
    for path in paths:
        plain = _normalize(await api.get(path))
        routed = _normalize(await api.get(path, params={"via": "route"}))
        assert plain == routed, path
        statuses.append(plain[0])
    assert statuses[:4] == [200, 200, 200, 404], statuses
    bodies = [json.loads((await api.get(f"/purchases/{i}")).content) for i in ids]
    assert [(b["status"], b["quantity"]) for b in bodies] == [
        ("pending", 2),
        ("pending", None),
        ("confirmed", 3),
    ]


async def test_plain_status_poll_skips_the_route_and_a_query_reaches_it(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached = requests_reaching(STATUS_ROUTE, monkeypatch)
    event = await create_event(api)
    status_url = (await purchase(api, event["id"])).json()["status_url"]

    plain = await api.get(status_url)
    queried = await api.get(status_url, params={"fresh": "1"})

    assert plain.status_code == queried.status_code == 200
    assert plain.headers["retry-after"] == "1"
    assert [scope["query_string"] for scope in reached] == [b"fresh=1"], (
        "only the poll with a query string reached the route"
    )


async def _cancelled_purchase(db: asyncpg.Pool, settings: Settings, event_id: str) -> UUID:
    purchase_id = PurchaseIds(settings.purchase_id_secret).new()
    await record_purchase(db, purchase_id=purchase_id, event_id=event_id)
    await db.execute(
        "UPDATE purchases SET status = 'cancelled', cancelled_at = now() WHERE id = $1",
        purchase_id,
    )
    return purchase_id


async def test_status_streams_are_answered_by_the_dispatch_as_by_the_route(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings
) -> None:
    event = await create_event(api)
    cancelled = await _cancelled_purchase(db, settings, event["id"])  # its stream ends at once
    stream = f"/purchases/{cancelled}/events"
    cases: list[tuple[str, dict[str, str]]] = [
        (stream, {}),
        (stream, {"Last-Event-ID": "cancelled"}),  # has the final status: 204
        (stream, {"Last-Event-ID": "pending"}),
        (stream, {"Origin": "https://shop.example"}),
        (f"/purchases/{uuid4()}/events", {}),  # never issued: 404
        (f"/purchases/{str(cancelled).upper()}/events", {}),
        ("/purchases/not-a-uuid/events", {}),
    ]
    statuses = []
    for path, headers in cases:
        dispatched = _normalize(await api.get(path, headers=headers))
        routed = _normalize(await api.get(path, params={"via": "route"}, headers=headers))
        assert dispatched == routed, (path, headers)
        statuses.append(dispatched[0])
    assert statuses == [200, 204, 200, 200, 404, 200, 422], statuses


async def test_a_plain_status_stream_skips_the_route_and_a_query_reaches_it(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached = requests_reaching(EVENTS_ROUTE, monkeypatch)
    event = await create_event(api)
    cancelled = await _cancelled_purchase(db, settings, event["id"])
    path = f"/purchases/{cancelled}/events"

    plain = await api.get(path)
    queried = await api.get(path, params={"fresh": "1"})

    assert plain.status_code == queried.status_code == 200
    assert _normalize(plain)[1] == _normalize(queried)[1]
    assert plain.content.startswith(b"id: cancelled\nevent: status\ndata: ")
    assert [scope["query_string"] for scope in reached] == [b"fresh=1"], (
        "only the stream with a query string reached the route"
    )


@pytest.mark.parametrize("query", ["", "?via=route"], ids=["dispatched", "routed"])
async def test_a_stream_failing_once_under_way_is_cut_short_with_its_own_error(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """Its 200 is sent: no second answer is attempted (that would be an ASGI protocol error,
    raised in place of the bug), the bug itself is raised, for the server to log."""
    event = await create_event(api)
    purchase_id = (await purchase(api, event["id"])).json()["purchase_id"]

    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug while the stream waits")

    monkeypatch.setattr(StatusFollower, "change", broken)
    with pytest.raises(RuntimeError, match="a bug while the stream waits"):
        await api.get(f"/purchases/{purchase_id}/events{query}")


@pytest.mark.parametrize(
    "path",
    ["/purchases/{purchase_id}", "/purchases/{purchase_id}?via=route", "/events/{event_id}"],
    ids=["dispatched", "routed", "event-route"],
)
async def test_a_bug_is_a_500_problem_a_page_on_another_origin_can_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Without CORS headers a browser hides the answer from the page, which sees only a failed
    fetch: it cannot tell a server error from a network one, nor show the problem."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            event = await create_event(client)
            purchase_id = (await purchase(client, event["id"])).json()["purchase_id"]

            async def broken(*_: Any, **__: Any) -> None:
                raise RuntimeError("a bug")

            monkeypatch.setattr(PurchaseService, "status", broken)
            monkeypatch.setattr(EventService, "get", broken)
            response = await client.get(
                path.format(purchase_id=purchase_id, event_id=event["id"]),
                headers={"Origin": "https://shop.example"},
            )

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "a bug" not in response.text  # never the exception itself
    assert response.headers["access-control-allow-origin"] in ("*", "https://shop.example")


async def test_a_reply_that_fails_as_it_is_sent_is_counted_as_the_500_sent_instead(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def counted(status: str) -> float:
        labels = {"method": "POST", "route": PURCHASE_PATH, "status": status}
        return REGISTRY.get_sample_value("ticketing_http_requests_total", labels) or 0.0

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            event = await create_event(client)
            before = {status: counted(status) for status in ("202", "500")}

            def broken(*_: Any, **__: Any) -> Any:
                raise RuntimeError("a bug while answering")

            monkeypatch.setattr(answers.Answer, "send", broken)
            response = await client.post(f"/events/{event['id']}/tickets/purchase", json=GOOD)

    assert response.status_code == 500
    assert counted("500") == before["500"] + 1
    assert counted("202") == before["202"]
