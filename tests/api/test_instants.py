"""Instants: every accepted date-time lies in the domain's range, is stored as a finite
timestamptz and is served back with an offset.

asyncpg writes datetime.min and datetime.max (in UTC) as PostgreSQL's -infinity and infinity and
reads them back naive, so the edges of Python's range are refused at the API (422), refused by the
schema (CHECK), and a naive value in a response model fails loudly instead of being served.
"""

import json
from datetime import datetime
from uuid import uuid4

import asyncpg
import httpx
import pytest
from pydantic import ValidationError

from shared.events.models import Event
from shared.messages import PurchaseMessage
from shared.purchases.models import Purchase, PurchaseStatus
from tests.api.helpers import assert_problem
from tests.api.test_events import cursor_of, parse_time
from tests.factories import create_event, event_body

# The edges of Python's datetime range: in UTC they are datetime.min or datetime.max, or past them.
PYTHON_EDGES = [
    "0001-01-01T00:00:00Z",
    "0001-01-01T01:00:00+01:00",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-01:00",
]
OUTSIDE_DOMAIN = [
    "1969-12-31T23:59:59.999999Z",
    "1970-01-01T00:30:00+01:00",  # 1969-12-31T23:30:00Z
    "2200-01-01T00:00:00Z",
    "2199-12-31T23:30:00-01:00",  # 2200-01-01T00:30:00Z
]
INSIDE_DOMAIN = [
    "1970-01-01T00:00:00Z",
    "1970-01-01T01:00:00+01:00",
    "2199-12-31T23:59:59.999999Z",
    "2027-06-12T19:30:00+02:00",
]


@pytest.mark.parametrize("starts_at", PYTHON_EDGES + OUTSIDE_DOMAIN)
async def test_create_with_starts_at_outside_the_domain_is_422_naming_the_range(
    api: httpx.AsyncClient, starts_at: str
) -> None:
    response = await api.post("/events", json=event_body(starts_at=starts_at))

    problem = assert_problem(response, 422)
    assert "starts_at" in problem["detail"]
    assert "1970-01-01" in problem["detail"]
    assert "2200-01-01" in problem["detail"]


@pytest.mark.parametrize("starts_at", INSIDE_DOMAIN)
async def test_starts_at_inside_the_domain_round_trips_the_same_instant_with_an_offset(
    api: httpx.AsyncClient, starts_at: str
) -> None:
    created = await create_event(api, starts_at=starts_at)
    read = (await api.get(f"/events/{created['id']}")).json()

    for event in (created, read):
        assert parse_time(event["starts_at"]) == parse_time(starts_at)
        parse_time(event["created_at"])  # each asserts an offset
        parse_time(event["updated_at"])


@pytest.mark.parametrize("starts_at", PYTHON_EDGES + OUTSIDE_DOMAIN)
async def test_patch_with_starts_at_outside_the_domain_is_422_and_changes_nothing(
    api: httpx.AsyncClient, starts_at: str
) -> None:
    created = await create_event(api)

    response = await api.patch(f"/events/{created['id']}", json={"starts_at": starts_at})

    assert_problem(response, 422)
    assert (await api.get(f"/events/{created['id']}")).json() == created


@pytest.mark.parametrize("created_at", PYTHON_EDGES + OUTSIDE_DOMAIN)
async def test_a_cursor_outside_the_domain_is_422(api: httpx.AsyncClient, created_at: str) -> None:
    response = await api.get("/events", params={"cursor": cursor_of(created_at, str(uuid4()))})

    assert_problem(response, 422)


@pytest.mark.parametrize("infinite", ["-infinity", "infinity"])
async def test_the_schema_refuses_an_infinite_event_instant(
    db: asyncpg.Pool, infinite: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="events_instants_finite"):
        await db.execute(
            "INSERT INTO events (id, name, starts_at, total_tickets, available_tickets) "
            "VALUES ($1, 'x', $2::text::timestamptz, 1, 1)",
            uuid4(),
            infinite,
        )


@pytest.mark.parametrize("column", ["accepted_at", "processed_at"])
async def test_the_schema_refuses_an_infinite_purchase_instant(
    db: asyncpg.Pool, column: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="purchases_instants_finite"):
        await db.execute(
            # The column name is one of two constants above, never input.
            f"INSERT INTO purchases (id, status, {column}) VALUES ($1, 'failed', 'infinity')",
            uuid4(),
        )


def test_a_naive_datetime_never_reaches_a_response() -> None:
    naive = datetime(2027, 6, 12, 19, 30)
    event = {
        "id": uuid4(),
        "name": "x",
        "description": None,
        "venue": None,
        "starts_at": naive,
        "total_tickets": 1,
        "available_tickets": 1,
        "max_tickets_per_purchase": 1,
        "version": 1,
        "created_at": naive,
        "updated_at": naive,
    }
    with pytest.raises(ValidationError, match="timezone"):
        Event.model_validate(event)
    with pytest.raises(ValidationError, match="timezone"):
        Purchase(
            purchase_id=uuid4(),
            event_id=None,
            customer_id=None,
            quantity=None,
            status=PurchaseStatus.CONFIRMED,
            accepted_at=naive,
        )


@pytest.mark.parametrize("accepted_at", PYTHON_EDGES + OUTSIDE_DOMAIN)
def test_a_message_with_an_accepted_at_outside_the_domain_is_undecodable(accepted_at: str) -> None:
    purchase = {
        "purchase_id": str(uuid4()),
        "event_id": str(uuid4()),
        "customer_id": "c",
        "quantity": 1,
        "accepted_at": accepted_at,
    }
    body = json.dumps({"version": 1, "partition": 0, "purchases": [purchase]}).encode()

    with pytest.raises(ValidationError):
        PurchaseMessage.from_body(body)
