"""Purchase use cases: accept a purchase (validate, publish, 202) and report its status."""

import asyncio
import logging
from collections import OrderedDict
from datetime import UTC, datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from shared.errors import (
    EventNotFound,
    IdempotencyKeyReused,
    InvalidRequest,
    NotCancellable,
    NotConfirmable,
    PurchaseNotFound,
    SalesClosed,
    SalesNotOpen,
    ServiceUnavailable,
    SoldOut,
)
from shared.events.cache import EventCache
from shared.messages import (
    CONFIRM_MARGIN,
    Accepted,
    AcceptedCancel,
    AcceptedConfirm,
    AcceptedPurchase,
)
from shared.publisher import PurchasePublisher
from shared.purchases import repository
from shared.purchases.changes import StatusWaiters, Waiter
from shared.purchases.ids import PurchaseIds
from shared.purchases.models import (
    FailReason,
    Purchase,
    PurchaseCreate,
    PurchaseStatus,
    QueuePosition,
)
from shared.purchases.progress import PartitionProgress
from shared.retry import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)


_OUTAGE: tuple[type[BaseException], ...] = (ServiceUnavailable, *DATABASE_UNAVAILABLE)
# How far along its lifecycle each status is: a purchase only moves to a later one (a failed one
# may still be decided when its message is replayed).
_STAGE = {
    PurchaseStatus.PENDING: 0,
    PurchaseStatus.HELD: 1,
    PurchaseStatus.FAILED: 1,
    PurchaseStatus.CONFIRMED: 2,
    PurchaseStatus.REJECTED: 2,
    PurchaseStatus.EXPIRED: 3,
    PurchaseStatus.CANCELLED: 3,
}


def _older(latest: PurchaseStatus, seen: PurchaseStatus | None) -> bool:
    """Whether `latest` (as the listener read it for many waiters) is older than what this
    waiter saw: a read that started before the waiter's own may end after it."""
    return seen is not None and _STAGE[latest] < _STAGE[seen]


_NOTHING_TO_CONFIRM = (
    "Purchase {} needs no confirmation: its event holds no tickets, so a purchase is confirmed "
    "as soon as it is decided (see its status)."
)
# Failed is not final: once operators replay its message, the purchase is decided as any other;
# but for a message that could not be read, which no replay decides.
_NOT_WHILE_FAILED = (
    "Purchase {} could not be processed yet (see its status's reason); it cannot be {} until "
    "it is decided, once operators replay it. Keep following its status."
)
_NOT_READABLE = (
    "Purchase {} could not be processed: its message could not be read, so it will not be "
    "decided and holds no tickets; it cannot be {}."
)


def _queued_before_expiry(hold_expires_at: datetime, accepted_at: datetime) -> float:
    """The loop time by which a confirmation or cancellation of a hold must be queued for the
    worker to find the hold still there: its end plus CONFIRM_MARGIN (worker/decision.py).
    Queued later, the caller gets a 503 instead, and a retry finds out."""
    margin = hold_expires_at + CONFIRM_MARGIN - accepted_at
    return asyncio.get_running_loop().time() + margin.total_seconds()


def _failed(found: "_Found", purchase_id: UUID, action: str) -> str:
    """Why a failed purchase cannot be confirmed or cancelled (now, or ever)."""
    unreadable = found.reason == FailReason.UNDECODABLE_MESSAGE
    return (_NOT_READABLE if unreadable else _NOT_WHILE_FAILED).format(purchase_id, action)


# How long a retry with an Idempotency-Key waits to learn whether its purchase is already
# decided; past it, the purchase is published again (the worker applies an id once).
KEY_LOOKUP_WAIT_S = 1.0

# How often a waiting status request reads its purchase while the listener is reconnecting.
POLL_S = 1.0
# How long a confirmation or cancellation waits for a pending purchase accepted by another
# replica to be recorded (it must know the purchase's event), before a 503 asks to retry.
LOCATE_WAIT_S = 2.0
# Its reads: the first again after this, each next one twice as long after, up to the max.
LOCATE_FIRST_PAUSE_S = 0.05
LOCATE_MAX_PAUSE_S = 0.4


class _Found(NamedTuple):
    status: PurchaseStatus
    event_id: UUID | None
    hold_expires_at: datetime | None = None
    payment_reference: str | None = None
    reason: str | None = None


class RecentlyAccepted:
    """What this replica accepted lately, so a pending status can show the purchase's details
    before the worker has recorded it. Bounded: the oldest entries go first. An entry is the
    accepted purchase's plain tuple (about 0.5 KB), and the default bound keeps the whole near
    25 MB: ten seconds of a flood at 5,000 purchases/s per process, far longer than a purchase
    usually stays pending."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._max_entries = max_entries
        self._items: OrderedDict[UUID, AcceptedPurchase] = OrderedDict()

    def remember(self, purchase: AcceptedPurchase) -> None:
        # A retry with the same Idempotency-Key keeps the first: its message is ahead in the
        # partition, so it is the one the worker applies (and its acceptance time is the one).
        self._items.setdefault(purchase.purchase_id, purchase)
        if len(self._items) > self._max_entries:
            self._items.popitem(last=False)

    def get(self, purchase_id: UUID) -> AcceptedPurchase | None:
        return self._items.get(purchase_id)

    def __len__(self) -> int:
        return len(self._items)


class QueuedConfirmation(NamedTuple):
    payment_reference: str
    accepted_at: datetime  # of the latest confirmation with this reference


class QueuedConfirmations:
    """The last confirmation of each purchase this replica tried to queue lately: a second
    confirmation with another reference would be answered 202 and then dropped by the worker (a
    purchase is confirmed once), the buyer's second payment with it. Kept whatever the publish
    answered (a timed-out or late-confirmed message may be queued all the same); it stops
    counting once its partition's worker has decided past it. Bounded as RecentlyAccepted."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._max_entries = max_entries
        self._items: OrderedDict[UUID, QueuedConfirmation] = OrderedDict()

    def get(self, purchase_id: UUID) -> QueuedConfirmation | None:
        return self._items.get(purchase_id)

    def remember(self, purchase_id: UUID, payment_reference: str, accepted_at: datetime) -> None:
        self._items[purchase_id] = QueuedConfirmation(payment_reference, accepted_at)
        self._items.move_to_end(purchase_id)
        if len(self._items) > self._max_entries:
            self._items.popitem(last=False)


# A partition's worker records its progress at every commit and once a second while idle.
STALE_PROGRESS_S = 5.0


class PurchaseService:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        events: EventCache,
        publisher: PurchasePublisher,
        ids: PurchaseIds,
        recent: RecentlyAccepted,
        waiters: "StatusWaiters[Purchase] | None" = None,
        many_reads: asyncpg.Pool | None = None,
    ) -> None:
        self._pool = pool
        # Where the listener reads every purchase a commit woke: arrays of up to thousands of ids.
        self._many_reads = many_reads or pool
        self._events = events
        self._publisher = publisher
        self._ids = ids
        self._recent = recent
        self._confirmations = QueuedConfirmations()
        self._progress = PartitionProgress(pool)
        self._waiters = waiters
        if waiters is not None:
            waiters.fetch_with(self._read_many)

    async def submit(
        self, event_id: UUID, request: PurchaseCreate, *, idempotency_key: str | None
    ) -> UUID:
        """Queue a purchase and return its id once the broker has confirmed it."""
        # A retry of a purchase already decided gets its original answer, even if the event
        # sold out since (quite likely: it may have bought the last tickets).
        purchase_id: UUID | None = None
        if idempotency_key is not None:
            purchase_id = self._ids.for_idempotency_key(
                event_id=event_id, customer_id=request.customer_id, key=idempotency_key
            )
            # The first id layout derived another id for the same key: a purchase recorded
            # under it before the upgrade is this retry's purchase too.
            first_layout = self._ids.first_layout_for_idempotency_key(
                event_id=event_id, customer_id=request.customer_id, key=idempotency_key
            )
            recorded = await self._already_recorded((purchase_id, first_layout), request)
            if recorded is not None:
                return recorded

        event = await self._events.get(event_id)
        if event is None:
            raise EventNotFound(event_id)
        # Read once: a model's attributes cost several times a plain object's.
        customer_id, quantity = request.customer_id, request.quantity
        if quantity > event.max_tickets_per_purchase:
            raise InvalidRequest(
                f"quantity must be at most {event.max_tickets_per_purchase} for this event.",
                location=("body", "quantity"),
            )
        # The worker checks the window again against this same instant (this cache may be a
        # little stale); a purchase outside it is refused here, and nothing is published.
        accepted_at = datetime.now(UTC)
        refusal: SalesNotOpen | SalesClosed | SoldOut | None = None
        if event.sales_start_at is not None and accepted_at < event.sales_start_at:
            refusal = SalesNotOpen(event_id, event.sales_start_at.isoformat())
        elif event.sales_end_at is not None and accepted_at >= event.sales_end_at:
            refusal = SalesClosed(event_id, event.sales_end_at.isoformat())
        elif event.available_tickets == 0:
            refusal = SoldOut(event_id)
        if refusal is not None:
            # A retry of a purchase this replica queued (its 202 lost) is that purchase, still
            # queued and decided as of its own acceptance: "refused, nothing queued" would be
            # false. Its message is confirmed already, so nothing is published again.
            if purchase_id is not None and self._recent.get(purchase_id) is not None:
                return purchase_id
            raise refusal

        purchase_id = purchase_id or self._ids.new()
        purchase = AcceptedPurchase(purchase_id, event_id, customer_id, quantity, accepted_at)
        await self._publisher.publish(purchase)
        self._recent.remember(purchase)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "purchase accepted",
                extra={
                    "purchase_id": str(purchase_id),
                    "event_id": str(event_id),
                    "partition": self._publisher.partition_of(purchase),
                    "customer_id": customer_id,
                    "quantity": quantity,
                },
            )
        return purchase_id

    async def _already_recorded(
        self, candidates: tuple[UUID, ...], request: PurchaseCreate
    ) -> UUID | None:
        """The id of a retry's purchase when it is already decided (nothing to publish again);
        refuse a key reused for a different quantity, since the decided purchase would not
        match it."""
        # The read runs on its own and is waited for only so long: a database that stalls
        # (rather than refuses) would hold each keyed purchase for its statement timeout.
        read = asyncio.ensure_future(self._read_purchases(candidates))
        try:
            async with asyncio.timeout(KEY_LOOKUP_WAIT_S):  # not wait_for: see EventCache.get
                rows = await asyncio.shield(read)
        except DATABASE_UNAVAILABLE:  # TimeoutError among them
            # Without the database, publish again: the worker applies an id once, so a retry
            # stays one purchase; only a reused key's quantity goes unchecked.
            return None
        row = next((r for r in rows if r["status"] != PurchaseStatus.FAILED), None)
        if row is None:
            return None
        if row["quantity"] != request.quantity:
            raise IdempotencyKeyReused(
                f"This Idempotency-Key was already used for a purchase of {row['quantity']} "
                f"ticket(s); use a new key for a different purchase.",
                location=("header", "Idempotency-Key"),
            )
        return UUID(int=row["purchase_id"].int)  # a plain UUID, not the driver's subclass

    async def _read_purchases(self, purchase_ids: tuple[UUID, ...]) -> list[asyncpg.Record]:
        async with self._pool.acquire() as conn:
            return await repository.get_purchases(conn, purchase_ids)

    async def confirm(self, purchase_id: UUID, payment_reference: str) -> None:
        """Queue the confirmation of a held (or still pending) purchase; return once the
        broker has it. Confirming again with the same reference changes nothing."""
        found = await self._locate(purchase_id)
        if found.status == PurchaseStatus.CONFIRMED:
            if found.payment_reference == payment_reference:
                return  # nothing left to do
            if found.payment_reference is None:
                raise NotConfirmable(_NOTHING_TO_CONFIRM.format(purchase_id))
            raise NotConfirmable(
                f"Purchase {purchase_id} is already confirmed with another payment_reference."
            )
        if found.status == PurchaseStatus.FAILED:
            raise NotConfirmable(_failed(found, purchase_id, "confirmed"))
        if found.status not in (PurchaseStatus.HELD, PurchaseStatus.PENDING):
            raise NotConfirmable(
                f"Purchase {purchase_id} is {found.status}; it can no longer be confirmed."
            )
        assert found.event_id is not None
        if found.status == PurchaseStatus.PENDING and not await self._holds(found.event_id):
            # The worker will confirm it as it decides it, without a reference, and would drop
            # this confirmation: refused now rather than answered 202 and never applied.
            raise NotConfirmable(_NOTHING_TO_CONFIRM.format(purchase_id))
        accepted_at = datetime.now(UTC)
        deadline: float | None = None
        if found.hold_expires_at is not None:
            if accepted_at >= found.hold_expires_at:
                raise NotConfirmable(
                    f"The hold of purchase {purchase_id} ended at "
                    f"{found.hold_expires_at.isoformat()}: only a confirmation accepted before "
                    "then confirms it (see its status)."
                )
            deadline = _queued_before_expiry(found.hold_expires_at, accepted_at)
        confirm = AcceptedConfirm(purchase_id, found.event_id, payment_reference, accepted_at)
        queued = self._confirmations.get(purchase_id)
        if (
            queued is not None
            and queued.payment_reference != payment_reference
            and not await self._decided_past(confirm, queued.accepted_at)
        ):
            raise NotConfirmable(
                f"Purchase {purchase_id} has a confirmation with another payment_reference on "
                "its way; its status shows the reference it is confirmed with."
            )
        # Noted before the publish, so that a concurrent confirmation with another reference
        # finds it.
        self._confirmations.remember(purchase_id, payment_reference, accepted_at)
        await self._publisher.publish(confirm, deadline=deadline)
        log.info("purchase confirmation accepted", extra=self._context(confirm))

    async def _decided_past(self, command: Accepted, accepted_at: datetime) -> bool:
        """Whether the command's partition has decided everything accepted up to `accepted_at`:
        a confirmation accepted then that left the purchase unconfirmed was dropped, or never
        queued, and is not on its way any more."""
        row = await self._progress.of(self._publisher.partition_of(command))
        return row is not None and row["horizon"] > accepted_at

    async def _holds(self, event_id: UUID) -> bool:
        """Whether the event holds its purchases' tickets until they are confirmed (as this
        replica's cache has it; an event it cannot find is left for the worker to judge)."""
        event = await self._events.get(event_id)
        return event is None or event.hold_seconds is not None

    async def cancel(self, purchase_id: UUID) -> None:
        """Queue the cancellation of a pending, held or confirmed purchase; return once the
        broker has it. Cancelling again changes nothing."""
        found = await self._locate(purchase_id)
        if found.status == PurchaseStatus.CANCELLED:
            return
        if found.status not in (
            PurchaseStatus.HELD,
            PurchaseStatus.CONFIRMED,
            PurchaseStatus.PENDING,
        ):
            if found.status == PurchaseStatus.FAILED:
                raise NotCancellable(_failed(found, purchase_id, "cancelled"))
            raise NotCancellable(f"Purchase {purchase_id} is {found.status}; nothing to cancel.")
        assert found.event_id is not None
        event = await self._events.get(found.event_id)
        # Read after every wait: the publish deadline below counts from this instant.
        accepted_at = datetime.now(UTC)
        if event is not None and accepted_at >= event.starts_at:
            raise NotCancellable(f"Event {found.event_id} has started; it cannot be cancelled.")
        deadline: float | None = None
        if found.status == PurchaseStatus.HELD and found.hold_expires_at is not None:
            # As a confirmation: applied only if queued before the worker expires the hold, or
            # it would be answered 202 and the purchase end expired, not cancelled.
            if accepted_at >= found.hold_expires_at:
                raise NotCancellable(
                    f"The hold of purchase {purchase_id} ended at "
                    f"{found.hold_expires_at.isoformat()}: it expires and its tickets go back on "
                    "sale, unless a confirmation accepted before then confirms it (see its "
                    "status; a confirmed purchase can be cancelled)."
                )
            deadline = _queued_before_expiry(found.hold_expires_at, accepted_at)
        cancel = AcceptedCancel(purchase_id, found.event_id, accepted_at)
        await self._publisher.publish(cancel, deadline=deadline)
        log.info("purchase cancellation accepted", extra=self._context(cancel))

    async def _locate(self, purchase_id: UUID) -> "_Found":
        """The purchase's status and event. A pending one that this replica did not accept is
        waited for (a moment) until the worker records it: a confirmation or a cancellation
        must go to its event's partition."""
        if not self._ids.is_issued(purchase_id):
            raise PurchaseNotFound(purchase_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCATE_WAIT_S
        pause = LOCATE_FIRST_PAUSE_S
        while True:
            async with self._pool.acquire() as conn:
                row = await repository.get_purchase(conn, purchase_id)
            if row is not None:
                return _Found(
                    PurchaseStatus(row["status"]),
                    UUID(int=row["event_id"].int),  # a plain UUID: orjson writes no subclass
                    row["hold_expires_at"],
                    row["payment_reference"],
                    row["reason"],
                )
            known = self._recent.get(purchase_id)
            if known is not None:
                return _Found(PurchaseStatus.PENDING, known.event_id)
            if loop.time() >= deadline:
                raise ServiceUnavailable(
                    f"Purchase {purchase_id} is still being decided; retry shortly."
                )
            # Read less and less often: an id this replica never saw costs the pool a few
            # reads, not one every 50 ms (a client repeating such requests would take it).
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
            pause = min(2 * pause, LOCATE_MAX_PAUSE_S)

    def _context(self, command: Accepted) -> dict[str, object]:
        return {
            "purchase_id": str(command.purchase_id),
            "event_id": str(command.event_id),
            "partition": self._publisher.partition_of(command),
        }

    def follow(self, purchase_id: UUID) -> "StatusFollower":
        """`with service.follow(purchase_id) as follower:` wait for the purchase's changes with
        `await follower.change(...)`: once (a long-poll) or one after another (an event
        stream)."""
        return StatusFollower(self, self._waiters, purchase_id)

    @property
    def draining(self) -> bool:
        """Whether this process is stopping: status requests are no longer held."""
        return self._waiters is not None and self._waiters.released

    def release_waiters(self) -> None:
        """Answer every held status request now and hold no more (the process is stopping)."""
        if self._waiters is not None:
            self._waiters.release()

    async def _read_many(self, purchase_ids: list[UUID]) -> dict[UUID, Purchase]:
        """The recorded purchases among `purchase_ids` (what the listener wakes waiters with)."""
        async with self._many_reads.acquire() as conn:
            rows = await repository.get_purchases_in_full(conn, purchase_ids)
        purchases = [Purchase.model_validate(dict(row)) for row in rows]
        return {purchase.purchase_id: purchase for purchase in purchases}

    async def status(self, purchase_id: UUID) -> Purchase:
        if not self._ids.is_issued(purchase_id):
            raise PurchaseNotFound(purchase_id)
        async with self._pool.acquire() as conn:
            row = await repository.get_purchase(conn, purchase_id)
        if row is not None:
            return Purchase.model_validate(dict(row))
        known = self._recent.get(purchase_id)
        if known is None:
            return Purchase(
                purchase_id=purchase_id,
                event_id=None,
                customer_id=None,
                quantity=None,
                status=PurchaseStatus.PENDING,
                accepted_at=None,
            )
        return await self._pending(known)

    async def still_pending(self, purchase_id: UUID) -> Purchase | None:
        """A purchase this replica accepted and nobody has recorded yet, with the wait ahead of
        it now, read without its row: a follower is woken when the row appears. None if this
        replica has not seen it (only its row could tell more)."""
        known = self._recent.get(purchase_id)
        return None if known is None else await self._pending(known)

    async def _pending(self, known: AcceptedPurchase) -> Purchase:
        return Purchase(
            purchase_id=known.purchase_id,
            event_id=known.event_id,
            customer_id=known.customer_id,
            quantity=known.quantity,
            status=PurchaseStatus.PENDING,
            accepted_at=known.accepted_at,
            queue=await self._queue_position(known),
        )

    async def _queue_position(self, known: AcceptedPurchase) -> QueuePosition | None:
        """How much of its partition's accepted time is undecided ahead of the purchase, and how
        long that should take at the pace the partition's horizon has been advancing."""
        row = await self._progress.of(self._publisher.partition_of(known))
        if row is None:
            return None
        ahead_s = max(0.0, (known.accepted_at - row["horizon"]).total_seconds())
        # No record for a while: no worker is deciding the partition now, so no pace holds.
        rate = row["rate"] if row["age_s"] <= STALE_PROGRESS_S else None
        return QueuePosition(
            ahead_s=ahead_s,
            estimated_wait_s=ahead_s / rate if rate else None,
        )


class StatusFollower:
    """One purchase's status, followed for as long as the `with` block lasts.

    Waiting costs no database read: the worker's notification wakes the request, with the
    purchase as the listener read it. One waiter is kept throughout, so a change committed
    between two waits still wakes the next one, and the status the follower last saw stays
    current until a wake-up says otherwise: a follower reads its purchase when it starts, and
    after that only when the listener could not read it for it. Without a listener (or past its
    bound of waiters) a wait polls once a second, or is answered at once.

    Thousands wait at once, so a follower keeps the status it saw, not the purchase (about 1 KB
    as a model), and is one small object rather than a generator."""

    __slots__ = ("_purchase_id", "_seen", "_service", "_unread", "_waiter", "_waiters")

    def __init__(
        self,
        service: PurchaseService,
        waiters: "StatusWaiters[Purchase] | None",
        purchase_id: UUID,
    ) -> None:
        self._service = service
        self._waiters = waiters
        self._purchase_id = purchase_id
        self._waiter: Waiter[Purchase] | None = None
        self._seen: PurchaseStatus | None = None  # as last read or heard
        # Whether `_seen` may be out of date: nothing read yet, or a wake-up whose read failed.
        self._unread = True

    def __enter__(self) -> "StatusFollower":
        if self._waiters is not None:
            self._waiter = self._waiters.add(self._purchase_id)
        return self

    def __exit__(self, *_: object) -> None:
        if self._waiters is not None and self._waiter is not None:
            self._waiters.remove(self._purchase_id, self._waiter)
            self._waiter = None

    @property
    def unheard(self) -> bool:
        """Whether nothing wakes this follower on a commit (past the bound of waiters): it
        learns of a change only by reading."""
        return self._waiters is None or self._waiter is None

    async def change(self, *, unlike: frozenset[str], wait_s: float) -> Purchase | None:
        """The purchase as soon as its status is none of `unlike`. Otherwise, after `wait_s` or
        once the process is stopping: the purchase if it is at hand, else None (nothing changed
        that was heard: read it if you need it). Past the bound of waiters: the purchase as it
        is, at once."""
        waiters, waiter = self._waiters, self._waiter
        if waiters is None or waiter is None:
            return await self._service.status(self._purchase_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            if waiters.released:  # the process is stopping: nobody is held any longer
                return None
            remaining = deadline - loop.time()
            try:
                purchase = await self._current(waiters, waiter)
            except _OUTAGE:
                # The database is away (a restart, a failover): wait on while the client
                # does; at the deadline, the outage is the answer.
                if remaining <= 0:
                    raise
                await asyncio.sleep(min(remaining, POLL_S))
                continue
            if purchase is not None and purchase.status.value not in unlike:
                return purchase
            if remaining <= 0:
                return purchase
            purchase = None  # not kept while waiting (see the class's note)
            listening = waiters.listening
            await waiter.wait(remaining if listening else min(remaining, POLL_S))
            if listening and not waiter.woken:
                return None  # nothing was announced: it is as last seen

    async def _current(
        self, waiters: "StatusWaiters[Purchase]", waiter: Waiter[Purchase]
    ) -> Purchase | None:
        """The purchase as the listener read it when it woke us, or None while nothing was
        announced since the status last seen, else the purchase as read now."""
        if waiter.woken:
            latest = waiter.take()
            if latest is not None and not _older(latest.status, self._seen):
                self._seen, self._unread = latest.status, False
                return latest
            self._unread = True  # until read: should the read fail, the next try reads again
        elif not self._unread and waiters.listening:
            return None
        # Read after the waiter was added, so that a change committed meanwhile still wakes it.
        purchase = await self._service.status(self._purchase_id)
        self._seen, self._unread = purchase.status, False
        return purchase
