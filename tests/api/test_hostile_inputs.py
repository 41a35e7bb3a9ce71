"""Hostile inputs to POST /events and POST /events/{id}/tickets/purchase, one table.

Each case states the status it must get. Every refusal must be problem+json with that status
(never a 500); every acceptance of odd-but-valid text must round-trip it intact through GET.
The cases share one API, database and broker namespace (they only add rows and messages), which
keeps a table of this size fast.
"""

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx
import pytest
import pytest_asyncio

from tests.api.helpers import assert_problem, isolated_api
from tests.conftest import Services
from tests.factories import create_event

EVENT_PATH = "/events"
PURCHASE_PATH = "/events/{event_id}/tickets/purchase"
EVENT_MAX_PER_PURCHASE = 4

VALID_EVENT: dict[str, Any] = {
    "name": "Hostile night",
    "starts_at": "2027-06-12T19:30:00+02:00",
    "total_tickets": 100,
}
VALID_PURCHASE: dict[str, Any] = {"customer_id": "customer-1", "quantity": 1}

SQL = "'; DROP TABLE events; --"
SQL_PURCHASES = "x'); DELETE FROM purchases; --"
EMOJI = "🎸🔥 Rock 🇩🇪 👩‍👩‍👧"  # flags and a ZWJ family
RTL = "حفلة موسيقية \u202eevil\u202c שלום"  # Arabic, Hebrew, an RTL override
COMBINING = "Zalgo: Z\u0351\u0364\u0303a\u0301\u0300l\u0327g\u0308o\u0306 e\u0301 vs \u00e9"
ASTRAL = "𠜎𠜱𝕳𝖊𝖑𝖑𝖔 \u200b\ufeff zero-width"
TEN_KB = "x" * 10_240


@dataclass(frozen=True)
class Case:
    target: Literal["event", "purchase"]
    expected: int
    body: Any = None  # sent as UTF-8 JSON unless `raw` is given
    raw: bytes | None = None
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # overrides the target's path; {event_id} is filled in
    expect: dict[str, Any] = field(default_factory=dict)  # what GET must show, exactly


def event(**changes: Any) -> dict[str, Any]:
    return {**VALID_EVENT, **changes}


def event_without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID_EVENT.items() if k != name}


def buy(**changes: Any) -> dict[str, Any]:
    return {**VALID_PURCHASE, **changes}


def buy_without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID_PURCHASE.items() if k != name}


def raw_event(name_json: str = '"x"', total_json: str = "5") -> bytes:
    """An event body written by hand, for what json.dumps cannot produce."""
    return (
        f'{{"name": {name_json}, "starts_at": "2027-06-12T19:30:00+02:00", '
        f'"total_tickets": {total_json}}}'
    ).encode()


def raw_purchase(customer_json: str = '"c"', quantity_json: str = "1") -> bytes:
    return f'{{"customer_id": {customer_json}, "quantity": {quantity_json}}}'.encode()


def case(id_: str, case_: Case) -> Any:
    marks: list[Any] = []
    return pytest.param(case_, id=id_, marks=marks)


E: Final = "event"
P: Final = "purchase"

CASES = [
    # ---- POST /events: missing and extra fields
    case("event-missing-name", Case(E, 422, event_without("name"))),
    case("event-missing-starts_at", Case(E, 422, event_without("starts_at"))),
    case("event-missing-total_tickets", Case(E, 422, event_without("total_tickets"))),
    case("event-empty-object", Case(E, 422, {})),
    case("event-extra-unknown-field", Case(E, 422, event(price=10))),
    case("event-extra-available_tickets", Case(E, 422, event(available_tickets=1_000_000))),
    case("event-extra-id", Case(E, 422, event(id="00000000-0000-0000-0000-000000000000"))),
    case("event-extra-version", Case(E, 422, event(version=7))),
    # ---- POST /events: wrong types
    case("event-body-is-array", Case(E, 422, [VALID_EVENT])),
    case("event-body-is-null", Case(E, 422, raw=b"null")),
    case("event-body-is-string", Case(E, 422, "name")),
    case("event-body-is-number", Case(E, 422, raw=b"42")),
    case("event-name-number", Case(E, 422, event(name=123))),
    case("event-name-null", Case(E, 422, event(name=None))),
    case("event-name-list", Case(E, 422, event(name=["a"]))),
    case("event-name-object", Case(E, 422, event(name={"first": "a"}))),
    case("event-name-bool", Case(E, 422, event(name=True))),
    case("event-venue-number", Case(E, 422, event(venue=5))),
    case("event-starts_at-number-list", Case(E, 422, event(starts_at=[2027, 6, 12]))),
    # ---- POST /events: total_tickets out of range, huge, or not a strict int
    case("event-total-zero", Case(E, 422, event(total_tickets=0))),
    case("event-total-minus-1", Case(E, 422, event(total_tickets=-1))),
    case("event-total-1000001", Case(E, 422, event(total_tickets=1_000_001))),
    case("event-total-1000000", Case(E, 201, event(total_tickets=1_000_000))),
    case("event-total-1", Case(E, 201, event(total_tickets=1))),
    case("event-total-10e30", Case(E, 422, event(total_tickets=10**30))),
    case("event-total-minus-10e30", Case(E, 422, event(total_tickets=-(10**30)))),
    case("event-total-1e400", Case(E, 422, raw=raw_event(total_json="1e400"))),
    case("event-total-minus-1e400", Case(E, 422, raw=raw_event(total_json="-1e400"))),
    case("event-total-NaN", Case(E, 422, raw=raw_event(total_json="NaN"))),
    case("event-total-Infinity", Case(E, 422, raw=raw_event(total_json="Infinity"))),
    # Valid JSON, but more digits than Python converts: out of range, as any number past a bound.
    case("event-total-5000-digits", Case(E, 422, raw=raw_event(total_json="9" * 5000))),
    case("event-total-4301-digits", Case(E, 422, raw=raw_event(total_json="1" + "0" * 4300))),
    case("event-total-float-5.0", Case(E, 422, event(total_tickets=5.0))),
    case("event-total-float-5.5", Case(E, 422, event(total_tickets=5.5))),
    case("event-total-exponent-1e2", Case(E, 422, raw=raw_event(total_json="1e2"))),
    case("event-total-string", Case(E, 422, event(total_tickets="5"))),
    case("event-total-true", Case(E, 422, event(total_tickets=True))),
    case("event-total-null", Case(E, 422, event(total_tickets=None))),
    case("event-max-per-purchase-0", Case(E, 422, event(max_tickets_per_purchase=0))),
    case("event-max-per-purchase-101", Case(E, 422, event(max_tickets_per_purchase=101))),
    case("event-max-per-purchase-100", Case(E, 201, event(max_tickets_per_purchase=100))),
    case("event-max-per-purchase-string", Case(E, 422, event(max_tickets_per_purchase="10"))),
    case("event-max-per-purchase-float", Case(E, 422, event(max_tickets_per_purchase=10.0))),
    # ---- POST /events: starts_at
    case("event-starts_at-naive", Case(E, 422, event(starts_at="2027-06-12T19:30:00"))),
    case("event-starts_at-words", Case(E, 422, event(starts_at="next friday"))),
    case("event-starts_at-empty", Case(E, 422, event(starts_at=""))),
    case("event-starts_at-offset-25h", Case(E, 422, event(starts_at="2027-06-12T19:30:00+25:00"))),
    case("event-starts_at-month-13", Case(E, 422, event(starts_at="2027-13-12T19:30:00+02:00"))),
    case("event-starts_at-Z", Case(E, 201, event(starts_at="2027-06-12T19:30:00Z"))),
    case(
        "event-starts_at-unix-number",
        Case(E, 422, event(starts_at=1_800_000_000)),
    ),
    case(
        "event-starts_at-unix-digits-string",
        Case(E, 422, event(starts_at="1800000000")),
    ),
    case(
        "event-starts_at-year-1-plus-14h",
        Case(E, 422, event(starts_at="0001-01-01T00:00:00+14:00")),
    ),
    # ---- POST /events: strings (length, control characters, encoding)
    case("event-name-empty", Case(E, 422, event(name=""))),
    case("event-name-1-char", Case(E, 201, event(name="x"), expect={"name": "x"})),
    case("event-name-200-chars", Case(E, 201, event(name="n" * 200), expect={"name": "n" * 200})),
    case("event-name-201-chars", Case(E, 422, event(name="n" * 201))),
    case("event-name-10kb", Case(E, 422, event(name=TEN_KB))),
    case("event-venue-10kb", Case(E, 422, event(venue=TEN_KB))),
    case("event-description-10kb", Case(E, 422, event(description=TEN_KB))),
    case("event-name-NUL", Case(E, 422, event(name="a\u0000b"))),
    case("event-name-BEL", Case(E, 422, event(name="a\u0007b"))),
    case("event-name-ESC", Case(E, 422, event(name="\u001b[31mred"))),
    case("event-name-newline", Case(E, 422, event(name="two\nlines"))),
    case("event-name-DEL", Case(E, 422, event(name="a\u007fb"))),
    case("event-venue-NUL", Case(E, 422, event(venue="\u0000"))),
    case("event-description-NUL", Case(E, 422, event(description="text\u0000"))),
    case(
        "event-description-newlines-and-tabs",
        Case(
            E,
            201,
            event(description="line 1\n\tline 2\r\n"),
            expect={"description": "line 1\n\tline 2\r\n"},
        ),
    ),
    case("event-name-lone-high-surrogate", Case(E, 422, raw=raw_event(name_json='"\\ud800"'))),
    case("event-name-lone-low-surrogate", Case(E, 422, raw=raw_event(name_json='"a\\udc00b"'))),
    case(
        "event-name-reversed-surrogates",
        Case(E, 422, raw=raw_event(name_json='"\\udc00\\ud800"')),
    ),
    case(
        "event-name-escaped-surrogate-pair-is-emoji",
        Case(E, 201, raw=raw_event(name_json='"\\ud83c\\udfb8"'), expect={"name": "🎸"}),
    ),
    case("event-invalid-utf8", Case(E, 400, raw=raw_event().replace(b'"x"', b'"\xff"'))),
    case("event-name-emoji", Case(E, 201, event(name=EMOJI), expect={"name": EMOJI})),
    case(
        "event-name-rtl",
        Case(E, 201, event(name=RTL, venue=RTL), expect={"name": RTL, "venue": RTL}),
    ),
    case("event-name-combining", Case(E, 201, event(name=COMBINING), expect={"name": COMBINING})),
    case("event-name-astral-zero-width", Case(E, 201, event(name=ASTRAL), expect={"name": ASTRAL})),
    case(
        "event-sql-everywhere",
        Case(
            E,
            201,
            event(name=SQL, venue=SQL, description=SQL + "\n' OR '1'='1"),
            expect={"name": SQL, "venue": SQL, "description": SQL + "\n' OR '1'='1"},
        ),
    ),
    # ---- POST /events: syntax and media type
    case("event-malformed-json", Case(E, 400, raw=b'{"name": "x", "total_tickets": 5')),
    case("event-json-with-comment", Case(E, 400, raw=b'{"name": "x" /* hi */}')),
    case("event-deeply-nested", Case(E, 400, raw=b"[" * 20_000 + b"]" * 20_000)),
    case("event-text-plain", Case(E, 415, VALID_EVENT, content_type="text/plain")),
    case(
        "event-form",
        Case(
            E, 415, raw=b"name=x&total_tickets=5", content_type="application/x-www-form-urlencoded"
        ),
    ),
    case(
        "event-xml",
        Case(E, 415, raw=b"<event><name>x</name></event>", content_type="application/xml"),
    ),
    # ---- POST purchase: missing, extra, wrong types
    case("purchase-missing-quantity", Case(P, 422, buy_without("quantity"))),
    case("purchase-missing-customer", Case(P, 422, buy_without("customer_id"))),
    case("purchase-empty-object", Case(P, 422, {})),
    case("purchase-body-is-array", Case(P, 422, [VALID_PURCHASE])),
    case("purchase-extra-status", Case(P, 422, buy(status="confirmed"))),
    case("purchase-extra-price", Case(P, 422, buy(price=0))),
    case(
        "purchase-extra-event_id",
        Case(P, 422, buy(event_id="00000000-0000-0000-0000-000000000000")),
    ),
    case("purchase-customer-number", Case(P, 422, buy(customer_id=42))),
    case("purchase-customer-null", Case(P, 422, buy(customer_id=None))),
    case("purchase-customer-object", Case(P, 422, buy(customer_id={"$gt": ""}))),
    # ---- POST purchase: quantity
    case("purchase-quantity-zero", Case(P, 422, buy(quantity=0))),
    case("purchase-quantity-minus-1", Case(P, 422, buy(quantity=-1))),
    case(
        "purchase-quantity-over-event-max", Case(P, 422, buy(quantity=EVENT_MAX_PER_PURCHASE + 1))
    ),
    case("purchase-quantity-at-event-max", Case(P, 202, buy(quantity=EVENT_MAX_PER_PURCHASE))),
    case("purchase-quantity-101", Case(P, 422, buy(quantity=101))),
    case("purchase-quantity-10e30", Case(P, 422, buy(quantity=10**30))),
    case("purchase-quantity-1e400", Case(P, 422, raw=raw_purchase(quantity_json="1e400"))),
    case("purchase-quantity-5000-digits", Case(P, 422, raw=raw_purchase(quantity_json="9" * 5000))),
    case("purchase-quantity-float-2.0", Case(P, 422, buy(quantity=2.0))),
    case("purchase-quantity-string", Case(P, 422, buy(quantity="2"))),
    case("purchase-quantity-true", Case(P, 422, buy(quantity=True))),
    case("purchase-quantity-null", Case(P, 422, buy(quantity=None))),
    case("purchase-quantity-list", Case(P, 422, buy(quantity=[1]))),
    # ---- POST purchase: customer_id strings
    case("purchase-customer-empty", Case(P, 422, buy(customer_id=""))),
    case(
        "purchase-customer-100-chars",
        Case(P, 202, buy(customer_id="c" * 100), expect={"customer_id": "c" * 100}),
    ),
    case("purchase-customer-101-chars", Case(P, 422, buy(customer_id="c" * 101))),
    case("purchase-customer-10kb", Case(P, 422, buy(customer_id=TEN_KB))),
    case("purchase-customer-NUL", Case(P, 422, buy(customer_id="c\u0000"))),
    case("purchase-customer-BEL", Case(P, 422, buy(customer_id="\u0007"))),
    case(
        "purchase-customer-lone-surrogate",
        Case(P, 422, raw=raw_purchase(customer_json='"\\ud800"')),
    ),
    case(
        "purchase-customer-emoji",
        Case(P, 202, buy(customer_id=EMOJI), expect={"customer_id": EMOJI}),
    ),
    case("purchase-customer-rtl", Case(P, 202, buy(customer_id=RTL), expect={"customer_id": RTL})),
    case(
        "purchase-customer-combining",
        Case(P, 202, buy(customer_id=COMBINING), expect={"customer_id": COMBINING}),
    ),
    case(
        "purchase-customer-sql",
        Case(P, 202, buy(customer_id=SQL_PURCHASES), expect={"customer_id": SQL_PURCHASES}),
    ),
    # ---- POST purchase: path ids
    case(
        "purchase-path-id-word", Case(P, 422, VALID_PURCHASE, path="/events/abc/tickets/purchase")
    ),
    case(
        "purchase-path-id-sql",
        Case(P, 422, VALID_PURCHASE, path="/events/1%20OR%201=1/tickets/purchase"),
    ),
    case(
        "purchase-path-id-dotdot",
        Case(P, 422, VALID_PURCHASE, path="/events/%2e%2e/tickets/purchase"),
    ),
    case("purchase-path-id-NUL", Case(P, 422, VALID_PURCHASE, path="/events/%00/tickets/purchase")),
    case(
        "purchase-path-id-5000-chars",
        Case(P, 422, VALID_PURCHASE, path="/events/" + "f" * 5000 + "/tickets/purchase"),
    ),
    case(
        "purchase-path-id-unknown-uuid",
        Case(
            P,
            404,
            VALID_PURCHASE,
            path="/events/00000000-0000-4000-8000-000000000000/tickets/purchase",
        ),
    ),
    # ---- POST purchase: syntax and media type
    case("purchase-malformed-json", Case(P, 400, raw=b'{"customer_id": "c", "quantity": 1,}')),
    case("purchase-text-plain", Case(P, 415, VALID_PURCHASE, content_type="text/plain")),
    case("purchase-no-content-type", Case(P, 415, VALID_PURCHASE, content_type=None)),
    # ---- POST purchase: Idempotency-Key
    case("purchase-key-empty", Case(P, 422, VALID_PURCHASE, headers={"Idempotency-Key": ""})),
    case(
        "purchase-key-256-chars",
        Case(P, 422, VALID_PURCHASE, headers={"Idempotency-Key": "k" * 256}),
    ),
    case(
        "purchase-key-255-chars",
        Case(P, 202, VALID_PURCHASE, headers={"Idempotency-Key": "k" * 255}),
    ),
    case("purchase-key-BEL", Case(P, 422, VALID_PURCHASE, headers={"Idempotency-Key": "a\u0007b"})),
    case("purchase-key-tab", Case(P, 422, VALID_PURCHASE, headers={"Idempotency-Key": "a\tb"})),
    case("purchase-key-DEL", Case(P, 422, VALID_PURCHASE, headers={"Idempotency-Key": "a\u007fb"})),
    case("purchase-key-sql", Case(P, 202, VALID_PURCHASE, headers={"Idempotency-Key": SQL})),
]


@dataclass(frozen=True)
class Hostile:
    api: httpx.AsyncClient
    event_id: str


@pytest_asyncio.fixture(scope="module")
async def hostile(services: Services, template_database: str) -> AsyncIterator[Hostile]:
    async with isolated_api(services, template_database, "api_hostile") as isolated:
        target = await create_event(
            isolated.client,
            name="Target",
            total_tickets=1_000_000,
            max_tickets_per_purchase=EVENT_MAX_PER_PURCHASE,
        )
        yield Hostile(isolated.client, target["id"])


async def send(hostile: Hostile, case_: Case) -> httpx.Response:
    default_path = EVENT_PATH if case_.target == "event" else PURCHASE_PATH
    path = (case_.path or default_path).format(event_id=hostile.event_id)
    if case_.raw is not None:
        content = case_.raw
    else:
        content = json.dumps(case_.body, ensure_ascii=False).encode()
    request = hostile.api.build_request("POST", path, content=content, headers=case_.headers)
    request.headers.pop("content-type", None)
    if case_.content_type is not None:
        request.headers["content-type"] = case_.content_type
    return await hostile.api.send(request)


@pytest.mark.parametrize("case_", CASES)
async def test_hostile_input_gets_its_stated_status(hostile: Hostile, case_: Case) -> None:
    response = await send(hostile, case_)

    if case_.expected >= 400:
        assert_problem(response, case_.expected)
        return
    assert response.status_code == case_.expected, response.text
    if case_.target == "event":
        created = response.json()
        stored = (await hostile.api.get(f"/events/{created['id']}")).json()
        assert stored == created
    else:
        accepted = response.json()
        stored = (await hostile.api.get(accepted["status_url"])).json()
        assert stored["status"] == "pending"
        assert accepted["customer_id"] == stored["customer_id"]
        assert accepted["event_id"] == hostile.event_id
    for name, value in case_.expect.items():
        assert stored[name] == value, f"{name} changed on the way: {stored[name]!r}"


async def test_sql_looking_strings_are_stored_as_text_and_the_tables_survive(
    hostile: Hostile,
) -> None:
    created = await hostile.api.post("/events", json=event(name=SQL, description=SQL))
    bought = await hostile.api.post(
        PURCHASE_PATH.format(event_id=hostile.event_id), json=buy(customer_id=SQL_PURCHASES)
    )

    assert created.status_code == 201, created.text
    assert bought.status_code == 202, bought.text
    listing = await hostile.api.get("/events", params={"limit": 200})
    assert listing.status_code == 200
    names = [item["name"] for item in listing.json()["items"]]
    assert "Target" in names
    assert SQL in names
    again = await hostile.api.post(
        PURCHASE_PATH.format(event_id=hostile.event_id), json=VALID_PURCHASE
    )
    assert again.status_code == 202
    assert len(CASES) >= 40
