"""Helpers that build test data (through the public API where there is one) and check invariants
in SQL."""

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx

from shared.messages import AcceptedPurchase

# Decided: no longer pending (a held purchase is decided, if not for good).
FINAL = ("held", "confirmed", "rejected", "expired", "cancelled", "failed")


def event_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Flash sale",
        "starts_at": "2027-06-12T19:30:00+02:00",
        "total_tickets": 100,
        "max_tickets_per_purchase": 10,
    }
    body.update(overrides)
    return body


def accepted_purchase(event_id: UUID, i: int) -> AcceptedPurchase:
    """A purchase as the API hands it to the publisher: one ticket for customer `i`, now."""
    return AcceptedPurchase(
        purchase_id=uuid4(),
        event_id=event_id,
        customer_id=f"customer-{i}",
        quantity=1,
        accepted_at=datetime.now(UTC),
    )


async def create_event(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await client.post("/events", json=event_body(**overrides))
    assert response.status_code == 201, response.text
    event: dict[str, Any] = response.json()
    return event


async def purchase(
    client: httpx.AsyncClient,
    event_id: str | UUID,
    *,
    quantity: int = 1,
    customer_id: str = "customer-1",
    idempotency_key: str | None = None,
) -> httpx.Response:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return await client.post(
        f"/events/{event_id}/tickets/purchase",
        json={"customer_id": customer_id, "quantity": quantity},
        headers=headers,
    )


async def wait_until_final(
    pool: asyncpg.Pool, purchase_ids: Iterable[str | UUID], *, timeout_s: float = 60.0
) -> dict[UUID, asyncpg.Record]:
    """Wait until every purchase has a final status; return their rows by id."""
    wanted = [UUID(str(p)) for p in purchase_ids]
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await pool.fetch(
            "SELECT * FROM purchases WHERE id = ANY($1::uuid[]) AND status = ANY($2::text[])",
            wanted,
            list(FINAL),
        )
        if len(rows) == len(set(wanted)) or time.monotonic() > deadline:
            found = {row["id"]: row for row in rows}
            missing = set(wanted) - set(found)
            assert not missing, f"{len(missing)} of {len(set(wanted))} purchases never became final"
            return found
        await asyncio.sleep(0.1)


async def assert_no_oversell(pool: asyncpg.Pool) -> None:
    """Every invariant of the box office, in SQL:
    - per event: available + Σ held + Σ confirmed = total, and available ≥ 0;
    - per (event, customer): Σ held + Σ confirmed ≤ the event's max_tickets_per_customer;
    - each status carries what it means (a hold its end, a confirmation its time)."""
    broken = await pool.fetch(
        """
        SELECT e.id, e.total_tickets, e.available_tickets,
               coalesce(sum(p.quantity) FILTER (WHERE p.status IN ('held', 'confirmed')), 0)
                   AS taken
        FROM events e LEFT JOIN purchases p ON p.event_id = e.id
        GROUP BY e.id
        HAVING coalesce(sum(p.quantity) FILTER (WHERE p.status IN ('held', 'confirmed')), 0)
               + e.available_tickets <> e.total_tickets
            OR e.available_tickets < 0
        """
    )
    assert not broken, f"oversold or lost tickets: {[dict(r) for r in broken]}"
    over_limit = await pool.fetch(
        """
        SELECT p.event_id, p.customer_id, e.max_tickets_per_customer, sum(p.quantity) AS taken
        FROM purchases p JOIN events e ON e.id = p.event_id
        WHERE p.status IN ('held', 'confirmed') AND e.max_tickets_per_customer IS NOT NULL
        GROUP BY p.event_id, p.customer_id, e.max_tickets_per_customer
        HAVING sum(p.quantity) > e.max_tickets_per_customer
        """
    )
    assert not over_limit, f"customers over their limit: {[dict(r) for r in over_limit]}"
    inconsistent = await pool.fetch(
        """
        SELECT id, status, reason, hold_expires_at, confirmed_at, cancelled_at, payment_reference
        FROM purchases
        WHERE (status = 'held' AND hold_expires_at IS NULL)
           OR (status = 'confirmed' AND confirmed_at IS NULL)
           OR (status = 'cancelled') <> (cancelled_at IS NOT NULL)
           OR (status = 'expired' AND reason IS DISTINCT FROM 'hold_expired')
           OR (confirmed_at IS NOT NULL AND status NOT IN ('confirmed', 'cancelled'))
        LIMIT 10
        """
    )
    assert not inconsistent, (
        f"statuses and their fields disagree: {[dict(r) for r in inconsistent]}"
    )
