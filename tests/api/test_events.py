"""Events over HTTP: create, read, list (keyset pagination), partial update, delete."""

import base64
import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest

from api.openapi import render
from shared.settings import Settings
from tests.api.helpers import assert_problem, record_purchase
from tests.conftest import api_client
from tests.factories import create_event, event_body
from tests.faults.proxy import proxy_for, through

EVENT_FIELDS = {
    "id",
    "name",
    "description",
    "venue",
    "starts_at",
    "total_tickets",
    "available_tickets",
    "max_tickets_per_purchase",
    "sales_start_at",
    "sales_end_at",
    "max_tickets_per_customer",
    "hold_seconds",
    "version",
    "created_at",
    "updated_at",
}


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"{value!r} has no offset"
    return parsed


def cursor_of(created_at: str, event_id: str) -> str:
    """A cursor in the API's own encoding (urlsafe base64 of [created_at, id], unpadded)."""
    raw = json.dumps([created_at, event_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# --- create -------------------------------------------------------------------------------


async def test_create_event_is_201_with_location_and_the_full_event(
    api: httpx.AsyncClient,
) -> None:
    body = event_body(
        name="Rammstein — Olympiastadion",
        venue="Olympiastadion, Berlin",
        description="Stadium tour.\nDoors at 18:00.",
        total_tickets=20_000,
        max_tickets_per_purchase=4,
    )
    response = await api.post("/events", json=body)

    assert response.status_code == 201, response.text
    event = response.json()
    assert set(event) == EVENT_FIELDS
    assert response.headers["location"] == f"/events/{event['id']}"
    assert response.headers["etag"] == '"1"'
    UUID(event["id"])
    assert event["name"] == body["name"]
    assert event["venue"] == body["venue"]
    assert event["description"] == body["description"]
    assert parse_time(event["starts_at"]) == parse_time(body["starts_at"])
    assert event["total_tickets"] == 20_000
    assert event["available_tickets"] == 20_000
    assert event["max_tickets_per_purchase"] == 4
    assert event["version"] == 1
    assert parse_time(event["created_at"]) <= parse_time(event["updated_at"])

    fetched = await api.get(response.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == event


async def test_create_event_defaults_optional_fields(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/events",
        json={"name": "Minimal", "starts_at": "2027-01-01T20:00:00Z", "total_tickets": 1},
    )

    assert response.status_code == 201, response.text
    event = response.json()
    assert event["max_tickets_per_purchase"] == 10
    assert event["venue"] is None
    assert event["description"] is None
    assert event["available_tickets"] == 1


@pytest.mark.parametrize(
    "starts_at",
    ["2027-06-12T19:30:00", "2027-06-12 19:30:00", "2027-06-12"],
    ids=["naive-iso", "naive-space", "date-only"],
)
async def test_create_event_without_utc_offset_is_422(
    api: httpx.AsyncClient, starts_at: str
) -> None:
    response = await api.post("/events", json=event_body(starts_at=starts_at))

    problem = assert_problem(response, 422)
    assert "starts_at" in problem["detail"]


# --- read -----------------------------------------------------------------------------------


async def test_get_event_returns_it_with_its_version_as_etag(api: httpx.AsyncClient) -> None:
    created = await create_event(api, name="Readable")

    response = await api.get(f"/events/{created['id']}")

    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["etag"] == f'"{created["version"]}"'


async def test_get_unknown_event_is_404_problem(api: httpx.AsyncClient) -> None:
    unknown = uuid4()

    response = await api.get(f"/events/{unknown}")

    problem = assert_problem(response, 404)
    assert str(unknown) in problem["detail"]


@pytest.mark.parametrize(
    "event_id",
    ["abc", "123", "not-a-uuid-at-all-not-a-uuid-at-all-x", "%00", "a" * 500],
    ids=["word", "number", "36-chars", "nul", "500-chars"],
)
async def test_get_event_with_malformed_id_is_422(api: httpx.AsyncClient, event_id: str) -> None:
    response = await api.get(f"/events/{event_id}")

    assert_problem(response, 422)


# --- list -----------------------------------------------------------------------------------


async def walk_pages(api: httpx.AsyncClient, limit: int) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await api.get("/events", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        pages.append(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not end"


async def test_list_walks_every_event_exactly_once_in_creation_order(
    api: httpx.AsyncClient,
) -> None:
    created = [(await create_event(api, name=f"Event {i}"))["id"] for i in range(7)]

    pages = await walk_pages(api, limit=3)

    assert [len(page) for page in pages] == [3, 3, 1]
    seen = [event["id"] for page in pages for event in page]
    assert seen == created


async def test_list_pages_through_events_created_at_the_same_instant(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    # One INSERT gives every row the same created_at: only the id breaks the tie.
    await db.execute(
        """
        INSERT INTO events (id, name, starts_at, total_tickets, available_tickets)
        SELECT gen_random_uuid(), 'Tied ' || i, now(), 10, 10 FROM generate_series(1, 9) AS i
        """
    )
    expected = [str(row["id"]) for row in await db.fetch("SELECT id FROM events ORDER BY id")]

    pages = await walk_pages(api, limit=2)

    seen = [event["id"] for page in pages for event in page]
    assert seen == expected
    assert len(set(seen)) == 9


async def test_list_default_limit_is_50(api: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    await db.execute(
        """
        INSERT INTO events (id, name, starts_at, total_tickets, available_tickets, created_at)
        SELECT gen_random_uuid(), 'Bulk ' || i, now(), 10, 10, now() + i * interval '1 ms'
        FROM generate_series(1, 51) AS i
        """
    )

    first = await api.get("/events")
    rest = await api.get("/events", params={"cursor": first.json()["next_cursor"]})

    assert first.status_code == 200
    assert len(first.json()["items"]) == 50
    assert first.json()["next_cursor"] is not None
    assert len(rest.json()["items"]) == 1
    assert rest.json()["next_cursor"] is None


async def test_list_of_no_events_is_an_empty_last_page(api: httpx.AsyncClient) -> None:
    response = await api.get("/events")

    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


async def test_list_accepts_limit_bounds_1_and_200(api: httpx.AsyncClient) -> None:
    await create_event(api)
    await create_event(api)

    one = await api.get("/events", params={"limit": 1})
    most = await api.get("/events", params={"limit": 200})

    assert one.status_code == 200
    assert len(one.json()["items"]) == 1
    assert one.json()["next_cursor"] is not None
    assert most.status_code == 200
    assert len(most.json()["items"]) == 2


@pytest.mark.parametrize("limit", ["0", "201", "-1", "abc", "1.5", "", "1e3"])
async def test_list_with_out_of_range_or_non_integer_limit_is_422(
    api: httpx.AsyncClient, limit: str
) -> None:
    response = await api.get("/events", params={"limit": limit})

    problem = assert_problem(response, 422)
    assert "limit" in problem["detail"]


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!",
        "not base64 at all",
        base64.urlsafe_b64encode(b"{not json").decode(),
        base64.urlsafe_b64encode(b"null").decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'["x", "y"]').decode(),
        base64.urlsafe_b64encode(b'["2027-01-01T00:00:00", "x"]').decode(),
        cursor_of("2027-01-01T00:00:00", str(uuid4())),  # naive timestamp
        cursor_of("2027-01-01T00:00:00+00:00", "not-a-uuid"),
        "A" * 513,
    ],
    ids=[
        "punctuation",
        "spaces",
        "b64-not-json",
        "b64-null",
        "b64-numbers",
        "b64-strings",
        "b64-bad-id",
        "naive-timestamp",
        "aware-timestamp-bad-id",
        "too-long",
    ],
)
async def test_list_with_malformed_cursor_is_422(api: httpx.AsyncClient, cursor: str) -> None:
    response = await api.get("/events", params={"cursor": cursor})

    problem = assert_problem(response, 422)
    assert [error["loc"] for error in problem["errors"]] == [["query", "cursor"]]


# --- update ---------------------------------------------------------------------------------


async def test_patch_changes_only_the_fields_sent_and_bumps_the_version(
    api: httpx.AsyncClient,
) -> None:
    created = await create_event(api, name="Before", venue="Hall A", total_tickets=50)

    response = await api.patch(f"/events/{created['id']}", json={"venue": "Hall B"})

    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["venue"] == "Hall B"
    assert updated["version"] == created["version"] + 1
    assert response.headers["etag"] == f'"{updated["version"]}"'
    unchanged = {"name", "description", "starts_at", "total_tickets", "available_tickets"}
    assert {k: updated[k] for k in unchanged} == {k: created[k] for k in unchanged}
    assert parse_time(updated["updated_at"]) >= parse_time(created["updated_at"])
    assert (await api.get(f"/events/{created['id']}")).json() == updated


async def test_patch_can_clear_an_optional_field_with_null(api: httpx.AsyncClient) -> None:
    created = await create_event(api, venue="Somewhere")

    response = await api.patch(f"/events/{created['id']}", json={"venue": None})

    assert response.status_code == 200, response.text
    assert response.json()["venue"] is None


@pytest.mark.parametrize("if_match", ['"1"', "*", '"7", "1"', 'W/"1", "1"', '"1",,'])
async def test_patch_with_matching_if_match_applies(api: httpx.AsyncClient, if_match: str) -> None:
    created = await create_event(api)

    response = await api.patch(
        f"/events/{created['id']}", json={"name": "Renamed"}, headers={"If-Match": if_match}
    )

    assert response.status_code == 200, response.text
    assert response.json()["name"] == "Renamed"


@pytest.mark.parametrize("if_match", ['W/"1"', 'W/"1", W/"2"', '"2", W/"1"'])
async def test_patch_with_a_weak_if_match_is_412_and_changes_nothing(
    api: httpx.AsyncClient, if_match: str
) -> None:
    """RFC 9110 §13.1.1: If-Match compares strongly, so a weak tag never matches."""
    created = await create_event(api, name="Original")

    response = await api.patch(
        f"/events/{created['id']}", json={"name": "Weakly matched"}, headers={"If-Match": if_match}
    )

    assert_problem(response, 412)
    current = (await api.get(f"/events/{created['id']}")).json()
    assert (current["name"], current["version"]) == ("Original", 1)


async def test_patch_with_stale_if_match_is_412_and_changes_nothing(
    api: httpx.AsyncClient,
) -> None:
    created = await create_event(api, name="Original")
    await api.patch(f"/events/{created['id']}", json={"venue": "v2"})  # now at version 2

    response = await api.patch(
        f"/events/{created['id']}",
        json={"name": "Lost update"},
        headers={"If-Match": f'"{created["version"]}"'},
    )

    assert_problem(response, 412)
    current = (await api.get(f"/events/{created['id']}")).json()
    assert current["name"] == "Original"
    assert current["version"] == 2


@pytest.mark.parametrize(
    "if_match",
    [
        "abc",
        '"x"',
        '"1234567890"',
        '"-1"',
        # The same number, another tag: compared strongly, never version 1.
        '"01"',
        '"0001", "2"',
        'W/"01"',
        "",
        '"1", x',
        '*, "1"',
        # Not entity-tags, though they name the event's version: the quotes are the tag's.
        "1",
        '"1',
        '1"',
        '"',
        "W/1",
        'W/"x", "1"',
    ],
)
async def test_patch_with_malformed_if_match_is_422(api: httpx.AsyncClient, if_match: str) -> None:
    created = await create_event(api, name="Original")

    response = await api.patch(
        f"/events/{created['id']}", json={"name": "x"}, headers={"If-Match": if_match}
    )

    problem = assert_problem(response, 422)
    assert [error["loc"] for error in problem["errors"]] == [["header", "If-Match"]]
    assert (await api.get(f"/events/{created['id']}")).json()["name"] == "Original"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [(['"1"', '"2"'], 200), (['"2"', '"1"'], 200), (['"1"', '"3"'], 412), (['"2"', "x"], 422)],
)
async def test_if_match_given_on_several_lines_is_one_list(
    api: httpx.AsyncClient, lines: list[str], expected: int
) -> None:
    """RFC 9110 §5.3: a header repeated is the list of its lines, so every line counts, not
    only the first (which refused a change the client's list allowed)."""
    created = await create_event(api, name="Original")
    await api.patch(f"/events/{created['id']}", json={"venue": "v2"})  # now at version 2

    response = await api.patch(
        f"/events/{created['id']}",
        json={"name": "Renamed"},
        headers=[("If-Match", line) for line in lines],
    )

    current = (await api.get(f"/events/{created['id']}")).json()
    if expected == 200:
        assert response.status_code == 200, response.text
        assert (current["name"], current["version"]) == ("Renamed", 3)
    else:
        assert_problem(response, expected)
        assert (current["name"], current["version"]) == ("Original", 2)


async def test_patch_total_tickets_below_tickets_sold_is_409(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    created = await create_event(api, total_tickets=100)
    # 30 sold, the way the worker records a sale.
    await db.execute(
        "UPDATE events SET available_tickets = 70, version = version + 1 WHERE id = $1",
        UUID(created["id"]),
    )

    response = await api.patch(f"/events/{created['id']}", json={"total_tickets": 29})

    problem = assert_problem(response, 409)
    assert "30" in problem["detail"]
    row = await db.fetchrow("SELECT * FROM events WHERE id = $1", UUID(created["id"]))
    assert row is not None
    assert (row["total_tickets"], row["available_tickets"]) == (100, 70)


async def test_patch_total_tickets_keeps_tickets_sold(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    created = await create_event(api, total_tickets=100)
    await db.execute("UPDATE events SET available_tickets = 70 WHERE id = $1", UUID(created["id"]))

    down_to_sold = await api.patch(f"/events/{created['id']}", json={"total_tickets": 30})
    raised = await api.patch(f"/events/{created['id']}", json={"total_tickets": 130})

    assert down_to_sold.status_code == 200, down_to_sold.text
    assert down_to_sold.json()["available_tickets"] == 0
    assert raised.status_code == 200, raised.text
    assert raised.json()["available_tickets"] == 100


@pytest.mark.parametrize(
    "changes",
    [
        {"name": None},
        {"starts_at": None},
        {"total_tickets": None},
        {"max_tickets_per_purchase": None},
        {"name": ""},
        {"starts_at": "2027-06-12T19:30:00"},
        {"total_tickets": 0},
        {"total_tickets": 5.0},
        {"total_tickets": "5"},
        {"max_tickets_per_purchase": 101},
        {"available_tickets": 1_000},
        {"version": 99},
        {"id": str(uuid4())},
    ],
    ids=[
        "null-name",
        "null-starts_at",
        "null-total",
        "null-max",
        "empty-name",
        "naive-starts_at",
        "zero-total",
        "float-total",
        "string-total",
        "max-101",
        "available_tickets-is-read-only",
        "version-is-read-only",
        "id-is-read-only",
    ],
)
async def test_patch_with_invalid_change_is_422_and_changes_nothing(
    api: httpx.AsyncClient, changes: dict[str, Any]
) -> None:
    created = await create_event(api)

    response = await api.patch(f"/events/{created['id']}", json=changes)

    assert_problem(response, 422)
    assert (await api.get(f"/events/{created['id']}")).json() == created


async def test_patch_unknown_event_is_404(api: httpx.AsyncClient) -> None:
    response = await api.patch(f"/events/{uuid4()}", json={"name": "x"})

    assert_problem(response, 404)


async def test_patch_malformed_id_is_422(api: httpx.AsyncClient) -> None:
    response = await api.patch("/events/not-a-uuid", json={"name": "x"})

    assert_problem(response, 422)


# --- delete ---------------------------------------------------------------------------------


async def test_delete_event_is_204_and_then_it_is_gone(api: httpx.AsyncClient) -> None:
    created = await create_event(api)

    response = await api.delete(f"/events/{created['id']}")

    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await api.get(f"/events/{created['id']}"), 404)
    assert_problem(await api.delete(f"/events/{created['id']}"), 404)


async def test_delete_event_with_recorded_purchases_is_409_and_keeps_it(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    created = await create_event(api)
    await record_purchase(db, purchase_id=uuid4(), event_id=created["id"])

    response = await api.delete(f"/events/{created['id']}")

    assert_problem(response, 409)
    assert (await api.get(f"/events/{created['id']}")).status_code == 200


async def test_delete_with_stale_if_match_is_412_and_keeps_it(api: httpx.AsyncClient) -> None:
    created = await create_event(api)
    await api.patch(f"/events/{created['id']}", json={"name": "v2"})

    response = await api.delete(
        f"/events/{created['id']}", headers={"If-Match": f'"{created["version"]}"'}
    )

    assert_problem(response, 412)
    assert (await api.get(f"/events/{created['id']}")).status_code == 200


@pytest.mark.parametrize(("if_match", "status"), [('W/"1"', 412), ('"01"', 422)])
async def test_delete_with_a_weak_or_foreign_if_match_is_refused_and_keeps_it(
    api: httpx.AsyncClient, if_match: str, status: int
) -> None:
    created = await create_event(api)

    response = await api.delete(f"/events/{created['id']}", headers={"If-Match": if_match})

    assert_problem(response, status)
    assert (await api.get(f"/events/{created['id']}")).status_code == 200


async def test_delete_with_if_match_naming_the_current_version_in_a_list_is_204(
    api: httpx.AsyncClient,
) -> None:
    created = await create_event(api)

    response = await api.delete(f"/events/{created['id']}", headers={"If-Match": '"3", "1"'})

    assert response.status_code == 204
    assert_problem(await api.get(f"/events/{created['id']}"), 404)


async def test_delete_with_if_match_naming_the_current_version_on_a_later_line_is_204(
    api: httpx.AsyncClient,
) -> None:
    created = await create_event(api)

    response = await api.delete(
        f"/events/{created['id']}", headers=[("If-Match", '"3"'), ("If-Match", '"1"')]
    )

    assert response.status_code == 204, response.text
    assert (await api.get(f"/events/{created['id']}")).status_code == 404


async def test_delete_with_current_if_match_is_204(api: httpx.AsyncClient) -> None:
    created = await create_event(api)

    response = await api.delete(
        f"/events/{created['id']}", headers={"If-Match": f'"{created["version"]}"'}
    )

    assert response.status_code == 204


async def test_a_delete_answers_204_with_no_content_headers(api: httpx.AsyncClient) -> None:
    """RFC 9110 §15.3.5 and §8.6: a 204 has no content, so nothing describes one."""
    created = await create_event(api)

    response = await api.delete(f"/events/{created['id']}")

    assert response.status_code == 204
    assert response.content == b""
    assert "content-type" not in response.headers
    assert "content-length" not in response.headers


async def test_delete_malformed_id_is_422(api: httpx.AsyncClient) -> None:
    assert_problem(await api.delete("/events/xyz"), 422)


async def test_event_timestamps_are_aware(api: httpx.AsyncClient) -> None:
    created = await create_event(api, starts_at="2030-01-01T00:00:00-05:00")

    assert parse_time(created["starts_at"]) == datetime(2030, 1, 1, 5, tzinfo=UTC)
    assert parse_time(created["created_at"]).tzinfo is not None


async def test_every_event_route_answers_503_while_postgresql_is_away_as_documented(
    settings: Settings,
) -> None:
    """Every event route reads or writes PostgreSQL, so while it is away each answers 503 with
    Retry-After (never a 500), and each operation of the document must say so."""
    async with proxy_for(settings.database_url, 5432) as proxy:
        cut_off = settings.model_copy(
            update={"database_url": through(settings.database_url, proxy.port)}
        )
        async with api_client(cut_off) as api:
            event = await create_event(api)
            proxy.cut()
            one = f"/events/{event['id']}"
            answers = {
                ("get", "/events"): await api.get("/events"),
                ("post", "/events"): await api.post("/events", json=event_body()),
                ("get", "/events/{event_id}"): await api.get(one),
                ("patch", "/events/{event_id}"): await api.patch(one, json={"name": "x"}),
                ("delete", "/events/{event_id}"): await api.delete(one),
            }

    paths = json.loads(render())["paths"]
    for (method, path), response in answers.items():
        assert_problem(response, 503)
        assert response.headers["retry-after"] == "1"
        assert "503" in paths[path][method]["responses"], f"{method.upper()} {path}"


@pytest.mark.parametrize(
    "field", ["name", "starts_at", "total_tickets", "max_tickets_per_purchase"]
)
async def test_a_field_every_event_has_is_documented_and_refused_as_null_in_a_patch(
    api: httpx.AsyncClient, field: str
) -> None:
    created = await create_event(api)
    schema = (await api.get("/openapi.json")).json()["components"]["schemas"]["EventUpdate"]

    response = await api.patch(f"/events/{created['id']}", json={field: None})

    documented = schema["properties"][field]
    assert "anyOf" not in documented
    assert "default" not in documented
    assert field not in schema.get("required", [])
    assert_problem(response, 422)
    assert [error["loc"] for error in response.json()["errors"]] == [["body", field]]


@pytest.mark.parametrize(
    "field", ["venue", "description", "sales_start_at", "max_tickets_per_customer", "hold_seconds"]
)
async def test_a_field_a_patch_may_remove_is_documented_as_nullable(
    api: httpx.AsyncClient, field: str
) -> None:
    schema = (await api.get("/openapi.json")).json()["components"]["schemas"]["EventUpdate"]

    assert {"type": "null"} in schema["properties"][field]["anyOf"]


@pytest.mark.parametrize(
    "changes",
    [{}, {"name": "Same"}, {"description": None}, {"starts_at": "2027-06-12T21:30:00+04:00"}],
    ids=["nothing", "same-name", "null-already-null", "same-instant-other-offset"],
)
async def test_a_patch_that_changes_nothing_keeps_the_version(
    api: httpx.AsyncClient, changes: dict[str, Any]
) -> None:
    """Another client's If-Match must still hold after a PATCH that changed nothing."""
    created = await create_event(api, name="Same", starts_at="2027-06-12T17:30:00Z")

    patched = await api.patch(f"/events/{created['id']}", json=changes)
    theirs = await api.patch(
        f"/events/{created['id']}",
        json={"name": "Theirs"},
        headers={"If-Match": f'"{created["version"]}"'},
    )

    assert patched.status_code == 200, patched.text
    assert patched.json() == created  # as stored: the instant in UTC, as GET answers it
    assert patched.headers["etag"] == f'"{created["version"]}"'
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["version"] == created["version"] + 1
