"""The API's memory of recently accepted purchases stays bounded and forgets the oldest first."""

from datetime import UTC, datetime
from uuid import uuid4

from shared.messages import AcceptedPurchase
from shared.purchases.service import RecentlyAccepted


def accepted(i: int) -> AcceptedPurchase:
    return AcceptedPurchase(
        purchase_id=uuid4(),
        event_id=uuid4(),
        customer_id=f"customer-{i}",
        quantity=1 + i % 3,
        accepted_at=datetime.now(UTC),
    )


def test_recently_accepted_keeps_the_details_of_a_pending_purchase() -> None:
    recent = RecentlyAccepted(max_entries=10)
    purchase = accepted(7)

    recent.remember(purchase)

    assert recent.get(purchase.purchase_id) == purchase
    assert recent.get(uuid4()) is None


def test_recently_accepted_is_bounded_and_forgets_the_oldest_first() -> None:
    recent = RecentlyAccepted(max_entries=100)
    purchases = [accepted(i) for i in range(250)]

    for purchase in purchases:
        recent.remember(purchase)

    assert len(recent) == 100
    assert all(recent.get(p.purchase_id) is None for p in purchases[:150])
    assert all(recent.get(p.purchase_id) is not None for p in purchases[150:])


def test_a_retry_of_a_pending_purchase_keeps_what_was_accepted_first() -> None:
    """The first message is ahead in the partition: the worker applies it and skips the retry's,
    so the pending status shows its quantity and acceptance time, not the retry's."""
    recent = RecentlyAccepted(max_entries=10)
    first = accepted(1)
    retry = first._replace(quantity=first.quantity + 1, accepted_at=datetime.now(UTC))

    recent.remember(first)
    recent.remember(retry)

    assert recent.get(first.purchase_id) == first
    assert len(recent) == 1
