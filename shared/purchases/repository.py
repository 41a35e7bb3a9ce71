"""SQL for purchases. Functions take a connection and never commit."""

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from shared.db import Connection
from shared.messages import ConfirmRequested, PurchaseRequested
from shared.purchases import changes
from shared.purchases.models import Decision, FailReason, Transition

SELECT_PURCHASE = """
    SELECT id AS purchase_id, event_id, customer_id, quantity, status, reason,
           accepted_at, processed_at, hold_expires_at, confirmed_at, cancelled_at,
           payment_reference
    FROM purchases
    WHERE id = $1
"""

SELECT_PURCHASES_IN_FULL = """
    SELECT id AS purchase_id, event_id, customer_id, quantity, status, reason,
           accepted_at, processed_at, hold_expires_at, confirmed_at, cancelled_at,
           payment_reference
    FROM purchases
    WHERE id = ANY($1::uuid[])
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
                           accepted_at, processed_at, partition, hold_expires_at, confirmed_at,
                           cancelled_at, payment_reference)
    SELECT u.id, u.event_id, u.customer_id, u.quantity, u.status, u.reason,
           u.accepted_at, now(), $8, u.hold_expires_at, u.confirmed_at, u.cancelled_at,
           u.payment_reference
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[],
                $7::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[],
                $12::text[])
         AS u(id, event_id, customer_id, quantity, status, reason, accepted_at,
              hold_expires_at, confirmed_at, cancelled_at, payment_reference)
    ON CONFLICT (id) DO UPDATE
        SET event_id = excluded.event_id, customer_id = excluded.customer_id,
            quantity = excluded.quantity, status = excluded.status, reason = excluded.reason,
            accepted_at = excluded.accepted_at, processed_at = excluded.processed_at,
            partition = excluded.partition, hold_expires_at = excluded.hold_expires_at,
            confirmed_at = excluded.confirmed_at, cancelled_at = excluded.cancelled_at,
            payment_reference = excluded.payment_reference
        WHERE purchases.status = 'failed'
    RETURNING id
"""

# What a batch may change, locked in id order: the purchases its confirmations and cancellations
# name, and the partition's holds whose end has passed `$3` (the latest the batch could expire),
# but for those kept for a confirmation that may still come.
LOCK_RECORDED = """
    SELECT id, event_id, customer_id, quantity, status, hold_expires_at, payment_reference,
           confirmed_at, hold_kept_since IS NOT NULL AS hold_kept
    FROM purchases
    WHERE id = ANY($1::uuid[])
       OR (partition = $2 AND status = 'held' AND hold_expires_at < $3
           AND hold_kept_since IS NULL)
    ORDER BY id
    FOR UPDATE
"""

# Keep the holds these confirmations would confirm (accepted before the hold's end) from
# expiring on the clock: each confirmation left its queue unapplied, or may yet. The ids kept now.
KEEP_HOLDS = """
    WITH due AS (
        -- Locked in id order, as a batch locks what it changes: no deadlock with one.
        SELECT p.id FROM purchases AS p
        JOIN unnest($1::uuid[], $2::timestamptz[]) AS c(id, accepted_at) ON c.id = p.id
        WHERE p.status = 'held' AND p.hold_kept_since IS NULL
          AND c.accepted_at < p.hold_expires_at
        ORDER BY p.id
        FOR UPDATE OF p
    )
    UPDATE purchases AS p
    SET hold_kept_since = now()
    FROM (SELECT DISTINCT id FROM due) AS d
    WHERE p.id = d.id
    RETURNING p.id
"""

# What became of them, read after the keep (a statement of its own: it sees an expiry that
# committed while the keep waited for the row).
KEPT_OR_NOT = """
    SELECT u.id, p.status,
           coalesce(p.status = 'held' AND p.hold_kept_since IS NOT NULL, false) AS kept
    FROM unnest($1::uuid[]) AS u(id)
    LEFT JOIN purchases AS p ON p.id = u.id
"""

# Each buyer's held and confirmed tickets of an event.
HOLDINGS = """
    SELECT p.event_id, p.customer_id, sum(p.quantity)::int AS tickets
    FROM purchases AS p
    JOIN unnest($1::uuid[], $2::text[]) AS b(event_id, customer_id)
      ON p.event_id = b.event_id AND p.customer_id = b.customer_id
    WHERE p.status IN ('held', 'confirmed')
    GROUP BY p.event_id, p.customer_id
"""

# Only rows still in the status the decision started from (the optimistic check).
APPLY_TRANSITIONS = """
    UPDATE purchases AS p
    SET status = u.after, reason = coalesce(u.reason, p.reason),
        confirmed_at = coalesce(u.confirmed_at, p.confirmed_at),
        cancelled_at = coalesce(u.cancelled_at, p.cancelled_at),
        payment_reference = coalesce(u.payment_reference, p.payment_reference)
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                $6::timestamptz[], $7::text[])
         AS u(id, before, after, reason, confirmed_at, cancelled_at, payment_reference)
    WHERE p.id = u.id AND p.status = u.before
    RETURNING p.id
"""

# Delivered to listeners when the transaction commits, dropped if it rolls back.
ANNOUNCE_CHANGED = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"

# A partition's owner records its progress at every commit and once a second while idle; a longer
# gap between two records is a time nobody was deciding it.
PACE_GAP_S = 3.0

# At the end of a commit, in one round trip: how far the partition is decided (the horizon only
# moves forward; the rate is smoothed with a weight that grows with the time since the last
# record, about two seconds' worth of history, so a pace that changes is followed within a few
# seconds), and the notification of the purchases the commit wrote (none: no notification).
RECORD_PROGRESS = """
    WITH progress AS (
        INSERT INTO partition_progress AS p (partition, horizon, recorded_at, rate)
        VALUES ($1, $2, now(), NULL)
        ON CONFLICT (partition) DO UPDATE SET
            horizon = greatest(p.horizon, excluded.horizon),
            recorded_at = excluded.recorded_at,
            rate = CASE
                WHEN excluded.recorded_at <= p.recorded_at THEN p.rate
                -- Nobody recorded for longer than a working owner ever leaves between two records
                -- (a worker stopped, the partition changed hands): that interval is no pace, and
                -- would make the first waits after it many times too long. Measured anew.
                WHEN extract(epoch FROM excluded.recorded_at - p.recorded_at) > $5 THEN NULL
                ELSE (
                    SELECT CASE WHEN p.rate IS NULL THEN sample.rate
                                ELSE sample.weight * sample.rate + (1 - sample.weight) * p.rate
                           END
                    FROM (
                        SELECT greatest(extract(epoch FROM excluded.horizon - p.horizon), 0)
                                   / extract(epoch FROM excluded.recorded_at - p.recorded_at)
                                   AS rate,
                               1 - exp(-extract(epoch FROM excluded.recorded_at - p.recorded_at)
                                       / 2) AS weight
                    ) AS sample
                )
            END
    )
    SELECT pg_notify($3, payload) FROM unnest($4::text[]) AS payload
"""

PROGRESS = """
    SELECT horizon, recorded_at, rate, extract(epoch FROM now() - recorded_at)::float8 AS age_s
    FROM partition_progress WHERE partition = $1
"""

EARLIEST_HOLD_END = """
    SELECT min(hold_expires_at) FROM purchases
    WHERE partition = $1 AND status = 'held' AND hold_kept_since IS NULL
"""

KEPT_HOLDS = """
    SELECT count(*)::int AS holds, min(hold_kept_since) AS since FROM purchases
    WHERE status = 'held' AND hold_kept_since IS NOT NULL
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


async def get_purchases_in_full(
    conn: Connection, purchase_ids: Sequence[UUID]
) -> list[asyncpg.Record]:
    return await conn.fetch(SELECT_PURCHASES_IN_FULL, list(purchase_ids))


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
        [d.hold_expires_at for d in decisions],
        [d.confirmed_at for d in decisions],
        [d.cancelled_at for d in decisions],
        [d.payment_reference for d in decisions],
    )
    return {row["id"] for row in rows}


async def lock_recorded(
    conn: Connection,
    *,
    purchase_ids: Sequence[UUID],
    partition: int,
    holds_ending_before: datetime | None,
) -> list[asyncpg.Record]:
    """The rows of `purchase_ids`, and the partition's holds ending before the given time
    (none when it is None), locked."""
    return await conn.fetch(LOCK_RECORDED, list(purchase_ids), partition, holds_ending_before)


async def holdings(
    conn: Connection, buyers: Sequence[tuple[UUID, str]]
) -> dict[tuple[UUID, str], int]:
    rows = await conn.fetch(HOLDINGS, [e for e, _ in buyers], [c for _, c in buyers])
    return {(row["event_id"], row["customer_id"]): row["tickets"] for row in rows}


async def apply_transitions(conn: Connection, transitions: Sequence[Transition]) -> set[UUID]:
    """Move recorded purchases on; return the ids moved (one missing had left its status)."""
    rows = await conn.fetch(
        APPLY_TRANSITIONS,
        [t.purchase_id for t in transitions],
        [t.before.value for t in transitions],
        [t.after.value for t in transitions],
        [None if t.reason is None else t.reason.value for t in transitions],
        [t.confirmed_at for t in transitions],
        [t.cancelled_at for t in transitions],
        [t.payment_reference for t in transitions],
    )
    return {row["id"] for row in rows}


async def announce_changed(conn: Connection, purchase_ids: Sequence[UUID]) -> None:
    """Tell the API's waiting requests, once this transaction commits, that these changed."""
    if purchase_ids:
        await conn.execute(ANNOUNCE_CHANGED, changes.CHANNEL, changes.payloads(purchase_ids))


async def record_progress(
    conn: Connection, partition: int, horizon: datetime, changed: Sequence[UUID] = ()
) -> None:
    """Inside a commit: everything accepted before `horizon` is decided in `partition`, and the
    purchases `changed` are announced to waiting requests (at commit)."""
    await conn.execute(
        RECORD_PROGRESS,
        partition,
        horizon,
        changes.CHANNEL,
        changes.payloads(changed),
        PACE_GAP_S,
    )


async def progress(conn: Connection, partition: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(PROGRESS, partition)
    return row


async def earliest_hold_end(conn: Connection, partition: int) -> datetime | None:
    """When the partition's next hold that may expire on the clock ends."""
    end: datetime | None = await conn.fetchval(EARLIEST_HOLD_END, partition)
    return end


class HoldOfConfirmation(NamedTuple):
    purchase_id: UUID
    status: str | None  # None: not recorded (its purchase not decided yet)
    kept: bool  # its hold does not expire on the clock
    kept_now: bool  # by this call


async def keep_holds(
    conn: Connection, confirmations: Sequence[ConfirmRequested]
) -> list[HoldOfConfirmation]:
    """Keep the holds `confirmations` would confirm from expiring; what became of each one's
    purchase (once per purchase)."""
    if not confirmations:
        return []
    kept_now = {
        row["id"]
        for row in await conn.fetch(
            KEEP_HOLDS,
            [c.purchase_id for c in confirmations],
            [c.accepted_at for c in confirmations],
        )
    }
    ids = sorted({c.purchase_id for c in confirmations})
    return [
        HoldOfConfirmation(row["id"], row["status"], row["kept"], row["id"] in kept_now)
        for row in await conn.fetch(KEPT_OR_NOT, ids)
    ]


async def kept_holds(conn: Connection) -> asyncpg.Record:
    """How many holds are kept for a confirmation, and since when the oldest."""
    row = await conn.fetchrow(KEPT_HOLDS)
    assert row is not None  # an aggregate without GROUP BY: always one row
    return row


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
    await announce_changed(conn, [p.purchase_id for p in purchases])


async def record_failed_ids(
    conn: Connection, purchase_ids: Sequence[UUID], *, reason: FailReason
) -> None:
    await conn.execute(RECORD_FAILED_IDS, list(purchase_ids), reason.value)
    await announce_changed(conn, purchase_ids)
