"""The decision step: which purchases of a batch get tickets. Pure: no I/O, no clock.

Kept apart from the transaction so its rules (first come, first served; never below zero; never
more than asked) can be tested exhaustively, and so that cancellations and per-customer limits
can be added here later.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

from shared.messages import PurchaseRequested
from shared.purchases.models import PurchaseStatus, RejectReason


@dataclass(frozen=True, slots=True)
class Outcome:
    purchase: PurchaseRequested
    status: PurchaseStatus
    reason: RejectReason | None = None


def decide(
    available: Mapping[UUID, int], purchases: Sequence[PurchaseRequested]
) -> tuple[dict[UUID, int], list[Outcome]]:
    """Apply `purchases` in order to the events' `available` tickets.

    Returns the events' new availability and one outcome per purchase, in the same order.
    An event missing from `available` does not exist.
    """
    left = dict(available)
    outcomes: list[Outcome] = []
    for purchase in purchases:
        tickets = left.get(purchase.event_id)
        if tickets is None:
            outcomes.append(
                Outcome(purchase, PurchaseStatus.REJECTED, RejectReason.EVENT_NOT_FOUND)
            )
        elif tickets == 0:
            outcomes.append(Outcome(purchase, PurchaseStatus.REJECTED, RejectReason.SOLD_OUT))
        elif purchase.quantity > tickets:
            outcomes.append(
                Outcome(purchase, PurchaseStatus.REJECTED, RejectReason.INSUFFICIENT_TICKETS)
            )
        else:
            left[purchase.event_id] = tickets - purchase.quantity
            outcomes.append(Outcome(purchase, PurchaseStatus.CONFIRMED))
    return left, outcomes
