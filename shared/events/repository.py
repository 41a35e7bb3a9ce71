"""SQL for events. Functions take a connection and never commit: the service owns the transaction."""

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from shared.db import Connection

INSERT_EVENT = """
    INSERT INTO events (id, name, description, venue, starts_at, total_tickets,
                        available_tickets, max_tickets_per_purchase, sales_start_at,
                        sales_end_at, max_tickets_per_customer, hold_seconds)
    VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10, $11)
    RETURNING *
"""

SELECT_EVENT = "SELECT * FROM events WHERE id = $1"

SELECT_EVENTS = "SELECT * FROM events WHERE id = ANY($1::uuid[])"

SELECT_EVENT_FOR_UPDATE = "SELECT * FROM events WHERE id = $1 FOR UPDATE"

LIST_EVENTS_FIRST_PAGE = """
    SELECT * FROM events
    ORDER BY created_at, id
    LIMIT $1
"""

LIST_EVENTS_AFTER_CURSOR = """
    SELECT * FROM events
    WHERE (created_at, id) > ($1, $2)
    ORDER BY created_at, id
    LIMIT $3
"""

UPDATE_EVENT = """
    UPDATE events
    SET name = $3, description = $4, venue = $5, starts_at = $6, total_tickets = $7,
        available_tickets = $8, max_tickets_per_purchase = $9, sales_start_at = $10,
        sales_end_at = $11, max_tickets_per_customer = $12, hold_seconds = $13,
        version = version + 1, updated_at = now()
    WHERE id = $1 AND version = $2
    RETURNING *
"""

DELETE_EVENT = "DELETE FROM events WHERE id = $1 AND version = $2"

EVENT_HAS_PURCHASES = "SELECT EXISTS (SELECT 1 FROM purchases WHERE event_id = $1)"


async def insert_event(
    conn: Connection,
    *,
    event_id: UUID,
    name: str,
    description: str | None,
    venue: str | None,
    starts_at: datetime,
    total_tickets: int,
    max_tickets_per_purchase: int,
    sales_start_at: datetime | None,
    sales_end_at: datetime | None,
    max_tickets_per_customer: int | None,
    hold_seconds: int | None,
) -> asyncpg.Record:
    row: asyncpg.Record | None = await conn.fetchrow(
        INSERT_EVENT,
        event_id,
        name,
        description,
        venue,
        starts_at,
        total_tickets,
        max_tickets_per_purchase,
        sales_start_at,
        sales_end_at,
        max_tickets_per_customer,
        hold_seconds,
    )
    assert row is not None  # INSERT ... RETURNING always returns the row
    return row


async def get_event(
    conn: Connection, event_id: UUID, *, for_update: bool = False
) -> asyncpg.Record | None:
    query = SELECT_EVENT_FOR_UPDATE if for_update else SELECT_EVENT
    row: asyncpg.Record | None = await conn.fetchrow(query, event_id)
    return row


async def get_events(conn: Connection, event_ids: list[UUID]) -> list[asyncpg.Record]:
    return await conn.fetch(SELECT_EVENTS, event_ids)


async def list_events(
    conn: Connection, *, limit: int, after: tuple[datetime, UUID] | None
) -> list[asyncpg.Record]:
    if after is None:
        return await conn.fetch(LIST_EVENTS_FIRST_PAGE, limit)
    return await conn.fetch(LIST_EVENTS_AFTER_CURSOR, after[0], after[1], limit)


async def update_event(
    conn: Connection, *, event_id: UUID, expected_version: int, fields: dict[str, Any]
) -> asyncpg.Record | None:
    """Write every column of `fields`; None when the version moved (optimistic lock lost)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        UPDATE_EVENT,
        event_id,
        expected_version,
        fields["name"],
        fields["description"],
        fields["venue"],
        fields["starts_at"],
        fields["total_tickets"],
        fields["available_tickets"],
        fields["max_tickets_per_purchase"],
        fields["sales_start_at"],
        fields["sales_end_at"],
        fields["max_tickets_per_customer"],
        fields["hold_seconds"],
    )
    return row


async def delete_event(conn: Connection, *, event_id: UUID, expected_version: int) -> None:
    await conn.execute(DELETE_EVENT, event_id, expected_version)


async def event_has_purchases(conn: Connection, event_id: UUID) -> bool:
    found: bool = await conn.fetchval(EVENT_HAS_PURCHASES, event_id)
    return found


# The worker's side. Rows are locked in id order so that two transactions touching the same
# events always queue up in the same order and can never deadlock.
LOCK_EVENTS_FOR_SALE = """
    SELECT id, available_tickets, version, starts_at, max_tickets_per_purchase, sales_start_at,
           sales_end_at, max_tickets_per_customer, hold_seconds
    FROM events
    WHERE id = ANY($1::uuid[])
    ORDER BY id
    FOR UPDATE
"""

SET_AVAILABLE_TICKETS = """
    UPDATE events AS e
    SET available_tickets = u.available_tickets, version = e.version + 1, updated_at = now()
    FROM unnest($1::uuid[], $2::int[], $3::int[]) AS u(id, available_tickets, version)
    WHERE e.id = u.id AND e.version = u.version
    RETURNING e.id
"""


async def lock_events_for_sale(conn: Connection, event_ids: list[UUID]) -> list[asyncpg.Record]:
    return await conn.fetch(LOCK_EVENTS_FOR_SALE, event_ids)


async def set_available_tickets(conn: Connection, changes: list[tuple[UUID, int, int]]) -> int:
    """Write (event id, available tickets, expected version) triples; return rows updated.

    Fewer rows than triples means some version moved since it was read: the caller rolls back.
    """
    rows = await conn.fetch(
        SET_AVAILABLE_TICKETS,
        [event_id for event_id, _, _ in changes],
        [available for _, available, _ in changes],
        [version for _, _, version in changes],
    )
    return len(rows)
