"""Event use cases, in DTOs and domain errors. Update and delete read the row before they write
it, so each runs in one transaction; create and the reads are one statement each, which needs
none."""

import base64
import binascii
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg
import orjson

from shared.db import Connection
from shared.errors import (
    Conflict,
    EventHasPurchases,
    EventNotFound,
    InvalidRequest,
    VersionMismatch,
)
from shared.events import repository
from shared.events.models import Event, EventCreate, EventPage, EventUpdate, check_sales_window
from shared.text import within_domain


def _stale(event_id: UUID, version: int, expected: frozenset[int]) -> VersionMismatch:
    if not expected:  # the request named only weak tags, which a change never matches
        return VersionMismatch(
            f"Event {event_id} is at version {version}; a weak ETag (W/) never matches the "
            "precondition of a change: send the strong one."
        )
    named = " or ".join(str(v) for v in sorted(expected))
    return VersionMismatch(
        f"Event {event_id} is at version {version}, not {named}; read it again and retry."
    )


async def _lock_at_version(
    conn: Connection, event_id: UUID, expected_versions: frozenset[int] | None
) -> asyncpg.Record:
    """The event's row, locked until the transaction ends, if it is at one of
    `expected_versions` (None: at any); EventNotFound, then VersionMismatch, if not."""
    # The row lock serialises this change against the worker's ticket commits; the version
    # check then catches a client changing the event from a stale read (If-Match).
    current = await repository.get_event(conn, event_id, for_update=True)
    if current is None:
        raise EventNotFound(event_id)
    if expected_versions is not None and current["version"] not in expected_versions:
        raise _stale(event_id, current["version"], expected_versions)
    return current


def encode_cursor(event: Event) -> str:
    raw = orjson.dumps([event.created_at.isoformat(), str(event.id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, event_id = orjson.loads(raw)
        after = (datetime.fromisoformat(created_at), UUID(event_id))
        if after[0].tzinfo is None:
            raise ValueError("not an instant we could have issued")
        within_domain(after[0])
    except (
        binascii.Error,
        orjson.JSONDecodeError,
        ValueError,
        TypeError,
        AttributeError,
        OverflowError,
    ) as exc:
        raise InvalidRequest(
            "The cursor is malformed; pass back a next_cursor as given.",
            location=("query", "cursor"),
        ) from exc
    return after


class EventService:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(self, data: EventCreate) -> Event:
        async with self._pool.acquire() as conn:
            row = await repository.insert_event(
                conn,
                event_id=uuid4(),
                name=data.name,
                description=data.description,
                venue=data.venue,
                starts_at=data.starts_at,
                total_tickets=data.total_tickets,
                max_tickets_per_purchase=data.max_tickets_per_purchase,
                sales_start_at=data.sales_start_at,
                sales_end_at=data.sales_end_at,
                max_tickets_per_customer=data.max_tickets_per_customer,
                hold_seconds=data.hold_seconds,
            )
        return Event.model_validate(dict(row))

    async def find(self, event_id: UUID) -> Event | None:
        async with self._pool.acquire() as conn:
            row = await repository.get_event(conn, event_id)
        return None if row is None else Event.model_validate(dict(row))

    async def find_many(self, event_ids: list[UUID]) -> dict[UUID, Event]:
        """The events of those ids that exist, by id (one query)."""
        async with self._pool.acquire() as conn:
            rows = await repository.get_events(conn, event_ids)
        events = (Event.model_validate(dict(row)) for row in rows)
        return {event.id: event for event in events}

    async def get(self, event_id: UUID) -> Event:
        event = await self.find(event_id)
        if event is None:
            raise EventNotFound(event_id)
        return event

    async def list(self, *, limit: int, cursor: str | None) -> EventPage:
        after = decode_cursor(cursor) if cursor else None
        async with self._pool.acquire() as conn:
            # One row more than asked tells whether another page exists.
            rows = await repository.list_events(conn, limit=limit + 1, after=after)
        items = [Event.model_validate(dict(row)) for row in rows[:limit]]
        next_cursor = encode_cursor(items[-1]) if len(rows) > limit else None
        return EventPage(items=items, next_cursor=next_cursor)

    async def update(
        self, event_id: UUID, data: EventUpdate, *, expected_versions: frozenset[int] | None
    ) -> Event:
        """Apply `data`, if the event is at one of `expected_versions` (None: at any)."""
        async with self._pool.acquire() as conn, conn.transaction():
            current = await _lock_at_version(conn, event_id, expected_versions)
            fields = dict(current) | data.model_dump(exclude_unset=True)
            try:
                check_sales_window(fields["sales_start_at"], fields["sales_end_at"])
            except ValueError as exc:
                sent = data.model_fields_set
                bound = "sales_start_at" if "sales_start_at" in sent else "sales_end_at"
                raise InvalidRequest(
                    f"{exc} (as the event would be after this change).",
                    location=("body", bound),
                ) from None
            sold = current["total_tickets"] - current["available_tickets"]
            if fields["total_tickets"] < sold:
                raise Conflict(
                    f"{sold} tickets are already sold; total_tickets cannot go below that."
                )
            fields["available_tickets"] = fields["total_tickets"] - sold
            if fields == dict(current):
                # Nothing changes, so neither does the version: every other client's If-Match
                # still holds (a form saved again unchanged would otherwise make them all 412).
                return Event.model_validate(dict(current))  # as stored, whatever offset was sent
            row = await repository.update_event(
                conn, event_id=event_id, expected_version=current["version"], fields=fields
            )
            if row is None:  # unreachable while we hold the row lock; kept as the invariant
                raise VersionMismatch(f"Event {event_id} changed concurrently; retry.")
        return Event.model_validate(dict(row))

    async def delete(self, event_id: UUID, *, expected_versions: frozenset[int] | None) -> None:
        """Delete the event, if it is at one of `expected_versions` (None: at any)."""
        async with self._pool.acquire() as conn, conn.transaction():
            current = await _lock_at_version(conn, event_id, expected_versions)
            if await repository.event_has_purchases(conn, event_id):
                raise EventHasPurchases(
                    f"Event {event_id} has recorded purchases and cannot be deleted."
                )
            await repository.delete_event(
                conn, event_id=event_id, expected_version=current["version"]
            )
