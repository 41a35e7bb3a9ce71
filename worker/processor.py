"""Apply one batch of a partition's purchases in one transaction."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from shared.events import repository as events
from shared.messages import PurchaseRequested
from shared.purchases import repository as purchases
from shared.purchases.models import Decision, PurchaseStatus
from worker import leases
from worker.decision import decide
from worker.leases import Lease


class VersionConflict(Exception):
    """An event's version moved between the locked read and the update; the batch rolls back."""


class RecordConflict(Exception):
    """Purchases the batch decided were recorded meanwhile by another transaction: the tickets
    the batch took for them must not be committed without their rows. The batch rolls back; a
    retry sees the rows and skips those purchases as already decided."""

    def __init__(self, partition: int, purchase_ids: set[UUID]) -> None:
        super().__init__(
            f"partition {partition}: {len(purchase_ids)} purchase(s) were recorded by another "
            "transaction during the batch"
        )
        self.purchase_ids = purchase_ids


@dataclass(slots=True)
class BatchResult:
    decisions: list[Decision] = field(default_factory=list)
    duplicates: int = 0

    def count(self, status: PurchaseStatus) -> int:
        return sum(1 for decision in self.decisions if decision.status == status)


async def apply_batch(
    pool: asyncpg.Pool, lease: Lease, batch: Sequence[PurchaseRequested]
) -> BatchResult:
    """Decide and record `batch` (in order) atomically; raise LeaseLost, VersionConflict or
    RecordConflict (rolled back, nothing written)."""
    async with pool.acquire() as conn, conn.transaction():
        # 1. Fencing: only the current lease holder commits for this partition.
        await leases.check_fence(conn, lease.partition, lease.owner, lease.epoch)

        # 2. Redelivered messages and Idempotency-Key retries carry ids already decided.
        decided = await purchases.final_purchase_ids(conn, [p.purchase_id for p in batch])
        fresh: list[PurchaseRequested] = []
        for purchase in batch:
            if purchase.purchase_id not in decided:
                decided.add(purchase.purchase_id)  # also drops repeats within the batch
                fresh.append(purchase)
        result = BatchResult(duplicates=len(batch) - len(fresh))
        if not fresh:
            return result

        # 3. Row locks, in id order. The lease already makes this worker the partition's only
        # writer of tickets, but events are also written by PATCH /events; the lock makes those
        # wait instead of interleaving, and the version check below proves that nothing wrote
        # the row between our read and our write.
        rows = await events.lock_events_for_sale(conn, sorted({p.event_id for p in fresh}))
        available = {row["id"]: row["available_tickets"] for row in rows}
        version = {row["id"]: row["version"] for row in rows}

        # 4. The decision itself is pure.
        left, result.decisions = decide(available, fresh)

        # 5. Every purchase row of the batch in one statement, and proof that each was written.
        written = await purchases.record_decisions(
            conn, partition=lease.partition, decisions=result.decisions
        )
        if len(written) != len(result.decisions):
            unwritten = {d.purchase.purchase_id for d in result.decisions} - written
            raise RecordConflict(lease.partition, unwritten)

        # 6. Optimistic lock: update only at the version read; fewer rows means a conflict.
        changes = [
            (event_id, tickets, version[event_id])
            for event_id, tickets in left.items()
            if tickets != available[event_id]
        ]
        if changes and await events.set_available_tickets(conn, changes) != len(changes):
            raise VersionConflict(f"partition {lease.partition}: an event version moved")
    # 7. Committed; the caller acks.
    return result
