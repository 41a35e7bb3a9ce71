"""The decision step: what a batch of a partition's commands does to its purchases and to its
events' tickets. Pure: no I/O, the clock comes in as `now`.

Commands apply in queue order, which is the order the API accepted them in:

- a purchase is rejected when its event is unknown (`event_not_found`), when it asks for more
  than the event's `max_tickets_per_purchase` allows now (`purchase_limit`), when the API accepted
  it before the sales window opened or after it closed (`sales_not_open`, `sales_closed`), when it
  would take its customer past the event's per-customer limit (`customer_limit`), or when the
  tickets are not there (`sold_out`, `insufficient_tickets`); otherwise it takes its tickets, and
  is held until `now + hold_seconds` if the event holds tickets, confirmed at once if not;
- a confirmation confirms a held purchase if the API accepted it before the hold's end; one that
  came later expires the purchase (`hold_expired`); anything else stays as it is;
- a cancellation cancels a held or confirmed purchase if the API accepted it before the event
  started, and gives its tickets back; anything else stays as it is;
- a hold that was not confirmed expires, and gives its tickets back, once the partition's
  horizon has passed its end by CONFIRM_MARGIN. The horizon is the latest acceptance time among
  the commands applied (and, when the queue is drained, `now` less DELIVERY_MARGIN): any
  confirmation or cancellation of a hold the API answered 202 for was queued within
  CONFIRM_MARGIN of the hold's end (api: their publish deadline), so it is ahead of any command
  accepted after that in the queue, and a hold never expires under one still on its way. A
  confirmation that left the queue unapplied (dead-lettered) keeps its hold from expiring at
  all: replayed, it confirms. A cancellation does not: replayed after the hold's end, it finds
  the purchase expired, its tickets already back.

A ticket given back goes to the first purchase applied after that which asks for it. No purchase
changes after it expired or was cancelled; a confirmed one changes only to cancelled.
"""

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from shared.messages import CONFIRM_MARGIN, CancelRequested, ConfirmRequested, PurchaseRequested
from shared.purchases.models import (
    HOLDING,
    Decision,
    ExpireReason,
    PurchaseStatus,
    RejectReason,
    Transition,
)

# With the queue drained, what was queued this long ago has been delivered and applied.
DELIVERY_MARGIN = timedelta(seconds=0.5)

Command = PurchaseRequested | ConfirmRequested | CancelRequested
GiveBack = Callable[["_State"], None]


@dataclass(frozen=True, slots=True)
class EventRules:
    """What the decision needs of an event (read from its locked row)."""

    available: int
    starts_at: datetime
    sales_start_at: datetime | None = None
    sales_end_at: datetime | None = None
    max_tickets_per_customer: int | None = None
    hold_seconds: int | None = None
    max_tickets_per_purchase: int | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """A purchase already recorded that the batch may change: held or confirmed (those hold
    tickets), or whatever a confirmation or cancellation of the batch names."""

    purchase_id: UUID
    event_id: UUID
    customer_id: str
    quantity: int
    status: PurchaseStatus
    hold_expires_at: datetime | None = None
    payment_reference: str | None = None
    confirmed_at: datetime | None = None
    # Kept for a confirmation that left the queue unapplied (dead-lettered), or may yet: it
    # does not expire on the clock.
    hold_kept: bool = False


@dataclass(slots=True)
class Outcome:
    decisions: list[Decision] = field(default_factory=list)  # new rows
    transitions: list[Transition] = field(default_factory=list)  # recorded rows that changed
    available: dict[UUID, int] = field(default_factory=dict)  # every event's tickets after
    horizon: datetime | None = None  # how far the partition's commands are applied


@dataclass(slots=True)
class _State:
    """A purchase as the batch goes: recorded before, or new in this batch."""

    event_id: UUID
    customer_id: str
    quantity: int
    status: PurchaseStatus
    hold_expires_at: datetime | None = None
    payment_reference: str | None = None
    confirmed_at: datetime | None = None
    cancelled_at: datetime | None = None
    reason: RejectReason | ExpireReason | None = None


def decide(
    events: Mapping[UUID, EventRules],
    recorded: Mapping[UUID, Recorded],
    holdings: Mapping[tuple[UUID, str], int],
    commands: Sequence[Command],
    *,
    now: datetime,
    horizon: datetime | None = None,
    drained: bool = False,
) -> Outcome:
    """Apply `commands` in order. `events` maps every event the batch touches (absent: no such
    event); `recorded`, the purchases already recorded that it may change (all the partition's
    held ones among them); `holdings`, each of the batch's buyers' held and confirmed tickets
    per event. `horizon` is the partition's horizon before the batch; `drained`, whether the
    queue holds nothing after it. Decisions come out in command order."""
    left = {event_id: rules.available for event_id, rules in events.items()}
    held = dict(holdings)
    states: dict[UUID, _State] = {
        purchase_id: _State(
            r.event_id,
            r.customer_id,
            r.quantity,
            r.status,
            r.hold_expires_at,
            r.payment_reference,
            r.confirmed_at,
        )
        for purchase_id, r in recorded.items()
    }
    new: dict[UUID, PurchaseRequested] = {}
    # Holds by end, to expire the due ones in end order without scanning every purchase.
    ends: list[tuple[datetime, int, UUID]] = []
    for purchase_id, state in states.items():
        kept = recorded[purchase_id].hold_kept
        if state.status == PurchaseStatus.HELD and state.hold_expires_at is not None and not kept:
            heapq.heappush(ends, (state.hold_expires_at, len(ends), purchase_id))

    def give_back(state: _State) -> None:
        left[state.event_id] = left.get(state.event_id, 0) + state.quantity
        key = (state.event_id, state.customer_id)
        if key in held:
            held[key] -= state.quantity

    def expire_due(up_to: datetime | None) -> None:
        while up_to is not None and ends and ends[0][0] + CONFIRM_MARGIN < up_to:
            state = states[heapq.heappop(ends)[2]]
            if state.status == PurchaseStatus.HELD:  # not confirmed or cancelled meanwhile
                state.status, state.reason = PurchaseStatus.EXPIRED, ExpireReason.HOLD_EXPIRED
                give_back(state)

    expire_due(horizon)
    for command in commands:
        horizon = command.accepted_at if horizon is None else max(horizon, command.accepted_at)
        expire_due(horizon)
        if isinstance(command, PurchaseRequested):
            if command.purchase_id in states:
                continue  # a repeat within the batch: applied once
            state = _purchase(command, events.get(command.event_id), left, held, now)
            states[command.purchase_id] = state
            new[command.purchase_id] = command
            if state.hold_expires_at is not None:
                heapq.heappush(ends, (state.hold_expires_at, len(states), command.purchase_id))
        elif isinstance(command, ConfirmRequested):
            _confirm(states.get(command.purchase_id), command, now, give_back)
        else:
            _cancel(states.get(command.purchase_id), command, events, now, give_back)
    if drained:
        end = now - DELIVERY_MARGIN
        horizon = end if horizon is None else max(horizon, end)
    expire_due(horizon)
    return _outcome(recorded, states, new, left, horizon)


def _purchase(
    command: PurchaseRequested,
    rules: EventRules | None,
    left: dict[UUID, int],
    held: dict[tuple[UUID, str], int],
    now: datetime,
) -> _State:
    def rejected(reason: RejectReason) -> _State:
        return _new_state(command, PurchaseStatus.REJECTED, reason=reason)

    if rules is None:
        return rejected(RejectReason.EVENT_NOT_FOUND)
    # Checked again here, as the sales window is: the API's cache may not yet know a lower limit.
    if rules.max_tickets_per_purchase is not None and (
        command.quantity > rules.max_tickets_per_purchase
    ):
        return rejected(RejectReason.PURCHASE_LIMIT)
    accepted = command.accepted_at
    if rules.sales_start_at is not None and accepted < rules.sales_start_at:
        return rejected(RejectReason.SALES_NOT_OPEN)
    if rules.sales_end_at is not None and accepted >= rules.sales_end_at:
        return rejected(RejectReason.SALES_CLOSED)
    key = (command.event_id, command.customer_id)
    limit = rules.max_tickets_per_customer
    if limit is not None and held.get(key, 0) + command.quantity > limit:
        return rejected(RejectReason.CUSTOMER_LIMIT)
    tickets = left[command.event_id]
    if tickets == 0:
        return rejected(RejectReason.SOLD_OUT)
    if command.quantity > tickets:
        return rejected(RejectReason.INSUFFICIENT_TICKETS)
    left[command.event_id] = tickets - command.quantity
    held[key] = held.get(key, 0) + command.quantity
    if rules.hold_seconds is None:
        return _new_state(command, PurchaseStatus.CONFIRMED, confirmed_at=now)
    until = now + timedelta(seconds=rules.hold_seconds)
    return _new_state(command, PurchaseStatus.HELD, hold_expires_at=until)


def _new_state(
    command: PurchaseRequested,
    status: PurchaseStatus,
    *,
    reason: RejectReason | None = None,
    hold_expires_at: datetime | None = None,
    confirmed_at: datetime | None = None,
) -> _State:
    return _State(
        command.event_id,
        command.customer_id,
        command.quantity,
        status,
        hold_expires_at=hold_expires_at,
        confirmed_at=confirmed_at,
        reason=reason,
    )


def _confirm(
    state: _State | None, command: ConfirmRequested, now: datetime, give_back: GiveBack
) -> None:
    if state is None or state.status != PurchaseStatus.HELD:
        return  # unknown here, or already past held: a confirmation changes nothing then
    assert state.hold_expires_at is not None
    if command.accepted_at < state.hold_expires_at:
        state.status = PurchaseStatus.CONFIRMED
        state.payment_reference = command.payment_reference
        state.confirmed_at = now
    else:
        state.status, state.reason = PurchaseStatus.EXPIRED, ExpireReason.HOLD_EXPIRED
        give_back(state)


def _cancel(
    state: _State | None,
    command: CancelRequested,
    events: Mapping[UUID, EventRules],
    now: datetime,
    give_back: GiveBack,
) -> None:
    if state is None or state.status not in HOLDING:
        return  # pending elsewhere, rejected, expired, cancelled, failed: nothing to give back
    rules = events.get(state.event_id)
    if rules is not None and command.accepted_at >= rules.starts_at:
        return  # the event had started: no refund then
    state.status = PurchaseStatus.CANCELLED
    state.cancelled_at = now
    give_back(state)


def _outcome(
    recorded: Mapping[UUID, Recorded],
    states: Mapping[UUID, _State],
    new: Mapping[UUID, PurchaseRequested],
    left: dict[UUID, int],
    horizon: datetime | None,
) -> Outcome:
    outcome = Outcome(available=left, horizon=horizon)
    for purchase_id, command in new.items():
        s = states[purchase_id]
        outcome.decisions.append(
            Decision(
                command,
                s.status,
                s.reason,
                hold_expires_at=s.hold_expires_at,
                confirmed_at=s.confirmed_at,
                cancelled_at=s.cancelled_at,
                payment_reference=s.payment_reference,
            )
        )
    for purchase_id, before in recorded.items():
        s = states[purchase_id]
        if s.status != before.status:
            outcome.transitions.append(
                Transition(
                    purchase_id,
                    s.event_id,
                    before.status,
                    s.status,
                    s.reason if isinstance(s.reason, ExpireReason) else None,
                    confirmed_at=s.confirmed_at,
                    cancelled_at=s.cancelled_at,
                    payment_reference=s.payment_reference,
                )
            )
    return outcome
