"""SQL for purchases. Functions take a connection and never commit."""

from collections.abc import Sequence
from uuid import UUID

import asyncpg

from shared.db import Connection
from shared.messages import PurchaseRequested
from shared.purchases.models import Decision, FailReason

SELECT_PURCHASE = """
    SELECT id AS purchase_id, event_id, customer_id, quantity, status, reason,
           accepted_at, processed_at
    FROM purchases
    WHERE id = $1
"""

SELECT_PURCHASES = """
    SELECT id AS purchase_id, status, quantity FROM purchases WHERE id = ANY($1::uuid[])
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
    RETURNING id
"""

# A failure never overwrites a decision: the purchase may have been applied before its message
# was dead-lettered (committed, then the worker died before the ack, delivery after delivery).
RECORD_FAILED_PURCHASES = """
    INSERT INTO purchases (id, event_id, customer_id, quantity, status, reason, accepted_at,
                           partition)
    SELECT u.id, u.event_id, u.customer_id, u.quantity, 'failed', $6, u.accepted_at, $7
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::timestamptz[])
         AS u(id, event_id, customer_id, quantity, accepted_at)
    ON CONFLICT (id) DO NOTHING
"""

# What an undecodable message still tells: the ids it carries.
RECORD_FAILED_IDS = """
    INSERT INTO purchases (id, status, reason)
    SELECT id, 'failed', $2 FROM unnest($1::uuid[]) AS u(id)
    ON CONFLICT (id) DO NOTHING
"""


async def get_purchase(conn: Connection, purchase_id: UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(SELECT_PURCHASE, purchase_id)
    return row


async def get_purchases(conn: Connection, purchase_ids: Sequence[UUID]) -> list[asyncpg.Record]:
    """Status and quantity of those of `purchase_ids` that are recorded."""
    return await conn.fetch(SELECT_PURCHASES, list(purchase_ids))


async def final_purchase_ids(conn: Connection, purchase_ids: Sequence[UUID]) -> set[UUID]:
    rows = await conn.fetch(SELECT_FINAL_PURCHASE_IDS, list(purchase_ids))
    return {row["id"] for row in rows}


async def record_decisions(
    conn: Connection, *, partition: int, decisions: Sequence[Decision]
) -> set[UUID]:
    """Write many decided purchases in one statement (one round trip for the whole batch);
    return the ids it wrote. One missing was already decided by another transaction."""
    rows = await conn.fetch(
        UPSERT_DECIDED_PURCHASES,
        [d.purchase.purchase_id for d in decisions],
        [d.purchase.event_id for d in decisions],
        [d.purchase.customer_id for d in decisions],
        [d.purchase.quantity for d in decisions],
        [d.status.value for d in decisions],
        [None if d.reason is None else d.reason.value for d in decisions],
        [d.purchase.accepted_at for d in decisions],
        partition,
    )
    return {row["id"] for row in rows}


async def record_failed_purchases(
    conn: Connection,
    purchases: Sequence[PurchaseRequested],
    *,
    reason: FailReason,
    partition: int | None = None,
) -> None:
    """Record `purchases` failed with `reason`, leaving any already decided as they are."""
    await conn.execute(
        RECORD_FAILED_PURCHASES,
        [p.purchase_id for p in purchases],
        [p.event_id for p in purchases],
        [p.customer_id for p in purchases],
        [p.quantity for p in purchases],
        [p.accepted_at for p in purchases],
        reason.value,
        partition,
    )


async def record_failed_ids(
    conn: Connection, purchase_ids: Sequence[UUID], *, reason: FailReason
) -> None:
    await conn.execute(RECORD_FAILED_IDS, list(purchase_ids), reason.value)
