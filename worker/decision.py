"""The decision step: which purchases of a batch get tickets. Pure: no I/O, no clock.

Kept apart from the transaction so its rules (first come, first served; never below zero; never
more than asked) can be tested exhaustively, and so that cancellations and per-customer limits
can be added here later.
"""

from collections.abc import Mapping, Sequence
from uuid import UUID

from shared.messages import PurchaseRequested
from shared.purchases.models import Decision, PurchaseStatus, RejectReason


def decide(
    available: Mapping[UUID, int], purchases: Sequence[PurchaseRequested]
) -> tuple[dict[UUID, int], list[Decision]]:
    """Apply `purchases` in order to the events' `available` tickets.

    Returns the events' new availability and one decision per purchase, in the same order.
    An event missing from `available` does not exist.
    """
    left = dict(available)
    decisions: list[Decision] = []
    for purchase in purchases:
        tickets = left.get(purchase.event_id)
        if tickets is None:
            decisions.append(
                Decision(purchase, PurchaseStatus.REJECTED, RejectReason.EVENT_NOT_FOUND)
            )
        elif tickets == 0:
            decisions.append(Decision(purchase, PurchaseStatus.REJECTED, RejectReason.SOLD_OUT))
        elif purchase.quantity > tickets:
            decisions.append(
                Decision(purchase, PurchaseStatus.REJECTED, RejectReason.INSUFFICIENT_TICKETS)
            )
        else:
            left[purchase.event_id] = tickets - purchase.quantity
            decisions.append(Decision(purchase, PurchaseStatus.CONFIRMED))
    return left, decisions
