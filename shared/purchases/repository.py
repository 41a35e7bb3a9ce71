"""SQL for purchases. Functions take a connection and never commit."""

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg

from shared.db import Connection

SELECT_PURCHASE = """
    SELECT id AS purchase_id, event_id, customer_id, quantity, status, reason,
           accepted_at, processed_at
    FROM purchases
    WHERE id = $1
"""

# A purchase decided once (confirmed or rejected) is final; one that failed (dead-lettered) may be
# decided later, when its message is replayed.
SELECT_FINAL_PURCHASE_IDS = """
    SELECT id FROM purchases WHERE id = ANY($1::uuid[]) AND status <> 'failed'
"""

UPSERT_DECIDED_PURCHASES = """
    INSERT INTO purchases (id, event_id, customer_id, quantity, status, reason,
                           accepted_at, processed_at, partition)
    SELECT u.id, u.event_id, u.customer_id, u.quantity, u.status, u.reason,
           u.accepted_at, now(), $8
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[],
                $7::timestamptz[]) AS u(id, event_id, customer_id, quantity, status, reason,
                                        accepted_at)
    ON CONFLICT (id) DO UPDATE
        SET event_id = excluded.event_id, customer_id = excluded.customer_id,
            quantity = excluded.quantity, status = excluded.status, reason = excluded.reason,
            accepted_at = excluded.accepted_at, processed_at = excluded.processed_at,
            partition = excluded.partition
        WHERE purchases.status = 'failed'
"""

# A failure never overwrites a decision: the purchase may have been applied before its message
# was dead-lettered (committed, then the worker died before the ack, delivery after delivery).
RECORD_FAILED_PURCHASE = """
    INSERT INTO purchases (id, event_id, customer_id, quantity, status, reason, accepted_at,
                           partition)
    VALUES ($1, $2, $3, $4, 'failed', $5, $6, $7)
    ON CONFLICT (id) DO NOTHING
"""


async def get_purchase(conn: Connection, purchase_id: UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(SELECT_PURCHASE, purchase_id)
    return row


async def final_purchase_ids(conn: Connection, purchase_ids: Sequence[UUID]) -> set[UUID]:
    rows = await conn.fetch(SELECT_FINAL_PURCHASE_IDS, list(purchase_ids))
    return {row["id"] for row in rows}


async def record_decisions(
    conn: Connection, *, partition: int, decisions: Sequence[dict[str, Any]]
) -> None:
    """Write many decided purchases in one statement (one round trip for the whole batch)."""
    await conn.execute(
        UPSERT_DECIDED_PURCHASES,
        [d["purchase_id"] for d in decisions],
        [d["event_id"] for d in decisions],
        [d["customer_id"] for d in decisions],
        [d["quantity"] for d in decisions],
        [d["status"] for d in decisions],
        [d["reason"] for d in decisions],
        [d["accepted_at"] for d in decisions],
        partition,
    )


async def record_failed(
    conn: Connection,
    *,
    purchase_id: UUID,
    reason: str,
    event_id: UUID | None = None,
    customer_id: str | None = None,
    quantity: int | None = None,
    accepted_at: Any = None,
    partition: int | None = None,
) -> None:
    await conn.execute(
        RECORD_FAILED_PURCHASE,
        purchase_id,
        event_id,
        customer_id,
        quantity,
        reason,
        accepted_at,
        partition,
    )
