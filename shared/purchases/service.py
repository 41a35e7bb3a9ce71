"""Purchase use cases: accept a purchase (validate, publish, 202) and report its status."""

import logging
from collections import OrderedDict
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from shared.errors import (
    EventNotFound,
    IdempotencyKeyReused,
    InvalidRequest,
    PurchaseNotFound,
    SoldOut,
)
from shared.events.cache import EventCache
from shared.messages import AcceptedPurchase
from shared.publisher import PurchasePublisher
from shared.purchases import repository
from shared.purchases.ids import PurchaseIds
from shared.purchases.models import Purchase, PurchaseCreate, PurchaseStatus
from shared.retry import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)


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
        self._items[purchase.purchase_id] = purchase
        if len(self._items) > self._max_entries:
            self._items.popitem(last=False)

    def get(self, purchase_id: UUID) -> AcceptedPurchase | None:
        return self._items.get(purchase_id)

    def __len__(self) -> int:
        return len(self._items)


class PurchaseService:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        events: EventCache,
        publisher: PurchasePublisher,
        ids: PurchaseIds,
        recent: RecentlyAccepted,
    ) -> None:
        self._pool = pool
        self._events = events
        self._publisher = publisher
        self._ids = ids
        self._recent = recent

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
        if request.quantity > event.max_tickets_per_purchase:
            raise InvalidRequest(
                f"quantity must be at most {event.max_tickets_per_purchase} for this event."
            )
        if event.available_tickets == 0:
            raise SoldOut(event_id)

        purchase_id = purchase_id or self._ids.new()
        purchase = AcceptedPurchase(
            purchase_id, event_id, request.customer_id, request.quantity, datetime.now(UTC)
        )
        await self._publisher.publish(purchase)
        self._recent.remember(purchase)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "purchase accepted",
                extra={
                    "purchase_id": str(purchase_id),
                    "event_id": str(event_id),
                    "partition": self._publisher.partition_of(purchase),
                    "customer_id": request.customer_id,
                    "quantity": request.quantity,
                },
            )
        return purchase_id

    async def _already_recorded(
        self, candidates: tuple[UUID, ...], request: PurchaseCreate
    ) -> UUID | None:
        """The id of a retry's purchase when it is already decided (nothing to publish again);
        refuse a key reused for a different quantity, since the decided purchase would not
        match it."""
        try:
            async with self._pool.acquire() as conn:
                rows = await repository.get_purchases(conn, candidates)
        except DATABASE_UNAVAILABLE:
            # Without the database, publish again: the worker applies an id once, so a retry
            # stays one purchase; only a reused key's quantity goes unchecked.
            return None
        row = next((r for r in rows if r["status"] != PurchaseStatus.FAILED), None)
        if row is None:
            return None
        if row["quantity"] != request.quantity:
            raise IdempotencyKeyReused(
                f"This Idempotency-Key was already used for a purchase of {row['quantity']} "
                f"ticket(s); use a new key for a different purchase."
            )
        return UUID(int=row["purchase_id"].int)  # a plain UUID, not the driver's subclass

    async def status(self, purchase_id: UUID) -> Purchase:
        if not self._ids.is_issued(purchase_id):
            raise PurchaseNotFound(purchase_id)
        async with self._pool.acquire() as conn:
            row = await repository.get_purchase(conn, purchase_id)
        if row is not None:
            return Purchase.model_validate(dict(row))
        known = self._recent.get(purchase_id)
        return Purchase(
            purchase_id=purchase_id,
            event_id=known.event_id if known else None,
            customer_id=known.customer_id if known else None,
            quantity=known.quantity if known else None,
            status=PurchaseStatus.PENDING,
            accepted_at=known.accepted_at if known else None,
        )
