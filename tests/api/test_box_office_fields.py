"""The event's box-office fields: sales window, per-customer limit, hold time. Each is optional,
validated at the API (422 naming the field), merged on PATCH, and backed by a CHECK in the schema."""

from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest

from tests.api.helpers import assert_problem
from tests.api.test_instants import OUTSIDE_DOMAIN, PYTHON_EDGES
from tests.factories import create_event, event_body

START = "2027-01-15T10:00:00+01:00"
END = "2027-06-12T18:00:00+02:00"


async def test_an_event_without_the_fields_has_them_null_and_sells_as_before(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api)
    for name in ("sales_start_at", "sales_end_at", "max_tickets_per_customer", "hold_seconds"):
        assert event[name] is None, name


async def test_the_fields_round_trip_through_create_get_and_list(api: httpx.AsyncClient) -> None:
    event = await create_event(
        api,
        sales_start_at=START,
        sales_end_at=END,
        max_tickets_per_customer=6,
        hold_seconds=600,
    )
    fetched = (await api.get(f"/events/{event['id']}")).json()
    listed = [e for e in (await api.get("/events")).json()["items"] if e["id"] == event["id"]]
    for body in (event, fetched, *listed):
        assert body["sales_start_at"] == "2027-01-15T09:00:00Z"
        assert body["sales_end_at"] == "2027-06-12T16:00:00Z"
        assert body["max_tickets_per_customer"] == 6
        assert body["hold_seconds"] == 600


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tickets_per_customer", 0),
        ("max_tickets_per_customer", 10_001),
        ("max_tickets_per_customer", "5"),
        ("max_tickets_per_customer", 2.0),
        ("max_tickets_per_customer", True),
        ("hold_seconds", 29),
        ("hold_seconds", 3_601),
        ("hold_seconds", "60"),
        ("hold_seconds", -1),
        ("sales_start_at", "2027-01-15T10:00:00"),  # no offset
        ("sales_end_at", "tomorrow"),
        ("sales_end_at", 1767225600),
        *[("sales_start_at", edge) for edge in PYTHON_EDGES + OUTSIDE_DOMAIN],
        *[("sales_end_at", edge) for edge in PYTHON_EDGES + OUTSIDE_DOMAIN],
    ],
)
async def test_a_bad_value_is_422_naming_the_field_on_create_and_patch(
    api: httpx.AsyncClient, field: str, value: Any
) -> None:
    created = await api.post("/events", json=event_body(**{field: value}))
    assert field in assert_problem(created, 422)["detail"]

    event = await create_event(api)
    patched = await api.patch(f"/events/{event['id']}", json={field: value})
    assert field in assert_problem(patched, 422)["detail"]
    assert (await api.get(f"/events/{event['id']}")).json() == event


@pytest.mark.parametrize("bounds", [(END, START), (START, START)])
async def test_a_window_that_does_not_start_before_it_ends_is_422(
    api: httpx.AsyncClient, bounds: tuple[str, str]
) -> None:
    start, end = bounds
    response = await api.post("/events", json=event_body(sales_start_at=start, sales_end_at=end))
    assert "sales_start_at must be before sales_end_at" in assert_problem(response, 422)["detail"]


async def test_patch_checks_the_window_it_would_leave_merged_with_what_is_stored(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api, sales_start_at=START)

    early_end = await api.patch(
        f"/events/{event['id']}", json={"sales_end_at": "2027-01-01T00:00:00Z"}
    )
    problem = assert_problem(early_end, 422)
    assert "sales_start_at" in problem["detail"]
    # Located at the bound the PATCH sent.
    assert [error["loc"] for error in problem["errors"]] == [["body", "sales_end_at"]]
    assert (await api.get(f"/events/{event['id']}")).json() == event

    both = await api.patch(
        f"/events/{event['id']}",
        json={"sales_start_at": "2026-12-31T00:00:00Z", "sales_end_at": "2027-01-01T00:00:00Z"},
    )
    assert both.status_code == 200, both.text
    assert both.json()["sales_start_at"] == "2026-12-31T00:00:00Z"


async def test_patch_with_null_removes_a_bound_a_limit_or_the_hold_and_absent_keeps_it(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(
        api, sales_start_at=START, sales_end_at=END, max_tickets_per_customer=6, hold_seconds=60
    )

    renamed = await api.patch(f"/events/{event['id']}", json={"name": "Renamed"})
    assert renamed.json()["hold_seconds"] == 60
    assert renamed.json()["sales_end_at"] == "2027-06-12T16:00:00Z"

    cleared = await api.patch(
        f"/events/{event['id']}",
        json={
            "sales_start_at": None,
            "sales_end_at": None,
            "max_tickets_per_customer": None,
            "hold_seconds": None,
        },
    )
    assert cleared.status_code == 200, cleared.text
    body = cleared.json()
    for name in ("sales_start_at", "sales_end_at", "max_tickets_per_customer", "hold_seconds"):
        assert body[name] is None, name
    assert body["version"] == event["version"] + 2


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET hold_seconds = 0",
        "UPDATE events SET max_tickets_per_customer = 0",
        "UPDATE events SET sales_start_at = now(), sales_end_at = now() - interval '1 s'",
        "UPDATE events SET sales_end_at = 'infinity'",
    ],
)
async def test_the_schema_backs_each_rule(
    api: httpx.AsyncClient, db: asyncpg.Pool, statement: str
) -> None:
    event = await create_event(api)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(f"{statement} WHERE id = $1", UUID(event["id"]))
