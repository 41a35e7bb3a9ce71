"""Apply one batch of a partition's commands in one transaction."""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import asyncpg

from shared.events import repository as events
from shared.messages import CONFIRM_MARGIN, ConfirmRequested, PurchaseRequested
from shared.purchases import repository as purchases
from shared.purchases.models import Decision, PurchaseStatus, Transition
from worker import leases
from worker.decision import DELIVERY_MARGIN, Command, EventRules, Recorded, decide
from worker.leases import Lease


class VersionConflict(Exception):
    """An event's version moved between the locked read and the update; the batch rolls back."""


class RecordConflict(Exception):
    """Purchases the batch decided were recorded, or moved on, meanwhile by another transaction:
    the tickets the batch took or gave back for them must not be committed without their rows.
    The batch rolls back; a retry reads those rows as they now are."""

    def __init__(self, partition: int, purchase_ids: set[UUID]) -> None:
        super().__init__(
            f"partition {partition}: {len(purchase_ids)} purchase(s) were written by another "
            "transaction during the batch"
        )
        self.purchase_ids = purchase_ids


@dataclass(slots=True)
class BatchResult:
    decisions: list[Decision] = field(default_factory=list)  # new purchases, decided
    transitions: list[Transition] = field(default_factory=list)  # recorded ones, moved on
    duplicates: int = 0
    horizon: datetime | None = None
    # The partition's earliest hold that may still expire, read again only when the batch gave,
    # ended or looked for due holds (holds_changed); otherwise it is what it was before.
    holds_changed: bool = False
    next_hold_end: datetime | None = None
    kept: list[purchases.HoldOfConfirmation] = field(default_factory=list)  # see `keep`

    def count(self, status: PurchaseStatus) -> int:
        return sum(1 for decision in self.decisions if decision.status == status)


async def apply_batch(
    pool: asyncpg.Pool,
    lease: Lease,
    commands: Sequence[Command],
    *,
    horizon: datetime | None = None,
    idle: bool = False,
    verify_drained: Callable[[], Awaitable[bool]] | None = None,
    holds_due: bool = True,
    keep: Sequence[ConfirmRequested] = (),
) -> BatchResult:
    """Decide and record `commands` (in order) atomically; raise LeaseLost, VersionConflict or
    RecordConflict (rolled back, nothing written). `horizon` is as for decide; `holds_due` is
    False when the caller knows no hold of the partition can be due yet; the holds `keep`'s
    confirmations would confirm are kept in the same transaction, once the batch's purchases
    are recorded (what became of each: `kept`).

    A hold may expire on the clock only once the partition's queue is known to be drained, or a
    confirmation still queued could find it gone. An empty inbox is not proof (the next
    deliveries may be on their way; a new owner may not be the active consumer yet), so when
    holds may be due, `verify_drained` asks the broker, inside this transaction, after its time
    is known. `idle` (nothing in hand) only moves the progress shown to waiting buyers."""
    async with pool.acquire() as conn, conn.transaction():
        # 1. Fencing: only the current lease holder commits for this partition.
        now = await leases.check_fence(conn, lease.partition, lease.owner, lease.epoch)

        # 2. Redelivered messages and Idempotency-Key retries carry ids already decided.
        bought = [c for c in commands if isinstance(c, PurchaseRequested)]
        decided = await purchases.final_purchase_ids(conn, [p.purchase_id for p in bought])
        fresh: list[Command] = []
        for command in commands:
            if isinstance(command, PurchaseRequested):
                if command.purchase_id in decided:
                    continue
                decided.add(command.purchase_id)  # also drops repeats within the batch
            fresh.append(command)
        result = BatchResult(duplicates=len(commands) - len(fresh), horizon=horizon)
        drained = holds_due and verify_drained is not None and await verify_drained()
        if not fresh and not drained:
            if idle:  # for the wait ahead only: not a horizon any hold may expire by
                shown = _later(horizon, now - DELIVERY_MARGIN)
                await purchases.record_progress(conn, lease.partition, shown)
            if keep:
                result.kept = await purchases.keep_holds(conn, keep)
            return result

        # 3. What the batch may change, locked: the purchases its confirmations and
        # cancellations name, and the holds that may expire during it (at most up to the
        # latest horizon it could reach).
        named = [c.purchase_id for c in fresh if not isinstance(c, PurchaseRequested)]
        latest = max([now, *(c.accepted_at for c in fresh)]) - CONFIRM_MARGIN
        rows = (
            await purchases.lock_recorded(
                conn,
                purchase_ids=named,
                partition=lease.partition,
                holds_ending_before=latest if holds_due else None,
            )
            if named or holds_due
            else []
        )
        recorded = {
            row["id"]: Recorded(
                row["id"],
                row["event_id"],
                row["customer_id"],
                row["quantity"],
                PurchaseStatus(row["status"]),
                row["hold_expires_at"],
                row["payment_reference"],
                row["confirmed_at"],
                row["hold_kept"],
            )
            for row in rows
            # A failed purchase is not a decision: replayed, its purchase is decided afresh (and a
            # confirmation or cancellation behind it then finds it held), never skipped as a
            # repeat of the failed row.
            if row["event_id"] is not None
            and row["quantity"] is not None
            and row["status"] != PurchaseStatus.FAILED
        }

        # 4. Row locks on the events, in id order. The lease already makes this worker the
        # partition's only writer of tickets, but events are also written by PATCH /events;
        # the lock makes those wait instead of interleaving, and the version check below proves
        # that nothing wrote the row between our read and our write.
        touched = {c.event_id for c in fresh} | {r.event_id for r in recorded.values()}
        locked = await events.lock_events_for_sale(conn, sorted(touched))
        rules = {row["id"]: _rules(row) for row in locked}
        version = {row["id"]: row["version"] for row in locked}

        # 5. What the batch's buyers already hold, where an event limits it.
        buyers = sorted(
            {
                (c.event_id, c.customer_id)
                for c in fresh
                if isinstance(c, PurchaseRequested)
                and c.event_id in rules
                and rules[c.event_id].max_tickets_per_customer is not None
            }
        )
        held = await purchases.holdings(conn, buyers) if buyers else {}

        # 6. The decision itself is pure.
        outcome = decide(rules, recorded, held, fresh, now=now, horizon=horizon, drained=drained)
        result.decisions, result.transitions = outcome.decisions, outcome.transitions
        result.horizon = outcome.horizon

        # 7. Every row of the batch in two statements, and proof that each was written.
        written: set[UUID] = set()
        if outcome.decisions:
            written = await purchases.record_decisions(
                conn, partition=lease.partition, decisions=outcome.decisions
            )
        unwritten = {d.purchase.purchase_id for d in outcome.decisions} - written
        if outcome.transitions:
            moved = await purchases.apply_transitions(conn, outcome.transitions)
            unwritten |= {t.purchase_id for t in outcome.transitions} - moved
        if unwritten:
            raise RecordConflict(lease.partition, unwritten)
        if keep:
            result.kept = await purchases.keep_holds(conn, keep)

        # 8. Optimistic lock: update only at the version read; fewer rows means a conflict.
        changes = [
            (event_id, tickets, version[event_id])
            for event_id, tickets in outcome.available.items()
            if event_id in rules and tickets != rules[event_id].available
        ]
        if changes and await events.set_available_tickets(conn, changes) != len(changes):
            raise VersionConflict(f"partition {lease.partition}: an event version moved")

        # 9. How far the partition is decided (the wait ahead of pending purchases), and the
        # notification of every purchase the batch wrote, heard by waiting requests at commit.
        written_ids = [d.purchase.purchase_id for d in outcome.decisions] + [
            t.purchase_id for t in outcome.transitions
        ]
        if outcome.horizon is not None:
            await purchases.record_progress(conn, lease.partition, outcome.horizon, written_ids)
        else:
            await purchases.announce_changed(conn, written_ids)

        # 10. When the partition's next hold ends, for its owner's sweep: read again when the
        # batch gave or ended a hold, and when it looked for due holds (a due one it could not
        # expire was kept for its confirmation, maybe by another transaction since the last
        # reading: the sweep must stop waiting for it).
        result.holds_changed = (
            bool(outcome.transitions)
            or any(d.status == PurchaseStatus.HELD for d in outcome.decisions)
            or holds_due
        )
        if result.holds_changed:
            result.next_hold_end = await purchases.earliest_hold_end(conn, lease.partition)
    # 11. Committed; the caller acks.
    return result


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None else max(a, b)


def _rules(row: asyncpg.Record) -> EventRules:
    return EventRules(
        available=row["available_tickets"],
        starts_at=row["starts_at"],
        max_tickets_per_purchase=row["max_tickets_per_purchase"],
        sales_start_at=row["sales_start_at"],
        sales_end_at=row["sales_end_at"],
        max_tickets_per_customer=row["max_tickets_per_customer"],
        hold_seconds=row["hold_seconds"],
    )
