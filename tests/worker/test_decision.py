"""The decision step (`worker.decision.decide`): first come, first served, never below zero, never
more than asked, the right reason for every rejection; and the box-office state machine (holds,
confirmations, cancellations, expiries, per-customer limits, sales windows) keeping every
invariant. Pure, so hypothesis explores it freely: the lifecycle properties drive it batch by
batch over a simulated partition, carrying its rows over as the worker's database would."""

import itertools
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from hypothesis import example, given
from hypothesis import strategies as st

from shared.messages import (
    CONFIRM_MARGIN,
    CancelRequested,
    ConfirmRequested,
    PurchaseRequested,
)
from shared.purchases.models import (
    HOLDING,
    Decision,
    ExpireReason,
    PurchaseStatus,
    RejectReason,
)
from tests.fuzzing import property_settings
from worker.decision import Command, EventRules, Recorded, decide

EVENTS = [UUID(int=n + 1) for n in range(4)]
UNKNOWN = UUID(int=999)
T0 = datetime(2027, 1, 1, tzinfo=UTC)
FAR = T0 + timedelta(days=365)

PROPERTY = property_settings(max_examples=300)
# A lifecycle example drives a whole simulated partition: fewer of them, as many as make fuzz asks.
LIFECYCLE = property_settings(max_examples=100)


def requested(
    event_id: UUID,
    quantity: int,
    purchase_id: UUID | None = None,
    *,
    customer: str = "customer",
    at: datetime = T0,
) -> PurchaseRequested:
    return PurchaseRequested(
        purchase_id=purchase_id or uuid4(),
        event_id=event_id,
        customer_id=customer,
        quantity=quantity,
        accepted_at=at,
    )


def plain(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> tuple[dict[UUID, int], list[Decision]]:
    """decide for events without holds, windows or limits: the purchase rules alone."""
    rules = {e: EventRules(available=n, starts_at=FAR) for e, n in available.items()}
    outcome = decide(rules, {}, {}, purchases, now=T0)
    return outcome.available, outcome.decisions


availability = st.dictionaries(
    st.sampled_from(EVENTS), st.integers(min_value=0, max_value=30), max_size=len(EVENTS)
)
purchase_lists = st.lists(
    st.builds(
        requested,
        st.sampled_from([*EVENTS, UNKNOWN]),
        st.integers(min_value=1, max_value=12),
        st.builds(uuid4),
    ),
    max_size=60,
)


def summary(decisions: list[Decision]) -> list[tuple[UUID, PurchaseStatus, object]]:
    return [(o.purchase.purchase_id, o.status, o.reason) for o in decisions]


# --- purchases alone ---------------------------------------------------------------------------


@PROPERTY
@given(availability, purchase_lists)
def test_availability_never_goes_negative_nor_above_what_it_was(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    left, _ = plain(available, purchases)
    assert set(left) == set(available), "events appeared or vanished"
    for event_id, tickets in left.items():
        assert 0 <= tickets <= available[event_id]


@PROPERTY
@given(availability, purchase_lists)
def test_confirmed_tickets_equal_exactly_what_availability_lost(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    left, decisions = plain(available, purchases)
    confirmed: dict[UUID, int] = defaultdict(int)
    for decision in decisions:
        if decision.status == PurchaseStatus.CONFIRMED:
            confirmed[decision.purchase.event_id] += decision.purchase.quantity
    for event_id, tickets in available.items():
        assert confirmed[event_id] == tickets - left[event_id]
    assert set(confirmed) <= set(available), "tickets confirmed for an unknown event"


@PROPERTY
@given(availability, purchase_lists)
def test_one_outcome_per_purchase_in_input_order(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    _, decisions = plain(available, purchases)
    assert [o.purchase for o in decisions] == purchases


@PROPERTY
@given(availability, purchase_lists)
def test_each_purchase_is_confirmed_iff_it_fits_in_what_earlier_purchases_left(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    """First come, first served, with the reason of every rejection: walk the purchases in order
    keeping what each event has left; a purchase gets its tickets exactly when they fit."""
    _, decisions = plain(available, purchases)
    remaining = dict(available)
    for decision in decisions:
        event_id, quantity = decision.purchase.event_id, decision.purchase.quantity
        before = remaining.get(event_id)
        if before is None:
            expected: tuple[PurchaseStatus, RejectReason | None] = (
                PurchaseStatus.REJECTED,
                RejectReason.EVENT_NOT_FOUND,
            )
        elif quantity <= before:
            expected = (PurchaseStatus.CONFIRMED, None)
            remaining[event_id] = before - quantity
        elif before == 0:
            expected = (PurchaseStatus.REJECTED, RejectReason.SOLD_OUT)
        else:
            expected = (PurchaseStatus.REJECTED, RejectReason.INSUFFICIENT_TICKETS)
        assert (decision.status, decision.reason) == expected


@PROPERTY
@given(availability, purchase_lists, st.integers(min_value=0, max_value=60))
def test_splitting_a_stream_into_batches_anywhere_gives_the_same_decisions(
    available: dict[UUID, int], purchases: list[PurchaseRequested], cut: int
) -> None:
    """The worker decides a partition batch by batch, carrying availability over: where the
    batches happen to be cut must not change any decision."""
    left, decisions = plain(available, purchases)
    cut = min(cut, len(purchases))
    middle, first = plain(available, purchases[:cut])
    final, second = plain(middle, purchases[cut:])
    assert final == left
    assert summary(first + second) == summary(decisions)


@PROPERTY
@given(availability, purchase_lists)
def test_each_event_is_decided_independently_of_the_others(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    left, decisions = plain(available, purchases)
    for event_id in {*available, UNKNOWN}:
        alone = {event_id: available[event_id]} if event_id in available else {}
        own = [p for p in purchases if p.event_id == event_id]
        own_left, own_decisions = plain(alone, own)
        assert summary(own_decisions) == summary(
            [o for o in decisions if o.purchase.event_id == event_id]
        )
        if event_id in available:
            assert own_left[event_id] == left[event_id]


def test_a_smaller_later_purchase_gets_what_a_larger_earlier_one_could_not() -> None:
    event = EVENTS[0]
    left, decisions = plain({event: 5}, [requested(event, q) for q in (2, 2, 2, 1, 1)])
    assert [(o.status, o.reason) for o in decisions] == [
        (PurchaseStatus.CONFIRMED, None),
        (PurchaseStatus.CONFIRMED, None),
        (PurchaseStatus.REJECTED, RejectReason.INSUFFICIENT_TICKETS),
        (PurchaseStatus.CONFIRMED, None),
        (PurchaseStatus.REJECTED, RejectReason.SOLD_OUT),
    ]
    assert left == {event: 0}


def test_an_unknown_event_is_rejected_and_left_out_of_availability() -> None:
    known = EVENTS[0]
    left, decisions = plain(
        {known: 2}, [requested(UNKNOWN, 1), requested(known, 1), requested(UNKNOWN, 1)]
    )
    assert [o.reason for o in decisions] == [
        RejectReason.EVENT_NOT_FOUND,
        None,
        RejectReason.EVENT_NOT_FOUND,
    ]
    assert left == {known: 1}


# --- the box-office lifecycle, over a simulated partition --------------------------------------


@dataclass
class Row:
    event_id: UUID
    customer_id: str
    quantity: int
    status: PurchaseStatus
    hold_expires_at: datetime | None = None
    payment_reference: str | None = None
    history: list[PurchaseStatus] = field(default_factory=list)
    hold_kept: bool = False


@dataclass
class Partition:
    """What the worker's database holds for one partition, as batch after batch leaves it."""

    rules: dict[UUID, EventRules]
    total: dict[UUID, int]
    rows: dict[UUID, Row] = field(default_factory=dict)
    horizon: datetime | None = None

    def apply(self, commands: list[Command], now: datetime, *, drained: bool = False) -> None:
        named = {c.purchase_id for c in commands if not isinstance(c, PurchaseRequested)}
        recorded = {
            pid: Recorded(
                pid,
                r.event_id,
                r.customer_id,
                r.quantity,
                r.status,
                r.hold_expires_at,
                r.payment_reference,
                hold_kept=r.hold_kept,
            )
            for pid, r in self.rows.items()
            if pid in named or r.status == PurchaseStatus.HELD
        }
        holdings: dict[tuple[UUID, str], int] = defaultdict(int)
        for r in self.rows.values():
            if r.status in HOLDING:
                holdings[(r.event_id, r.customer_id)] += r.quantity
        fresh = [
            c
            for c in commands
            if not (isinstance(c, PurchaseRequested) and c.purchase_id in self.rows)
        ]
        outcome = decide(
            self.rules, recorded, holdings, fresh, now=now, horizon=self.horizon, drained=drained
        )
        for d in outcome.decisions:
            p = d.purchase
            self.rows[p.purchase_id] = Row(
                p.event_id,
                p.customer_id,
                p.quantity,
                d.status,
                d.hold_expires_at,
                d.payment_reference,
                [d.status],
            )
        for t in outcome.transitions:
            row = self.rows[t.purchase_id]
            assert row.status == t.before
            row.status = t.after
            row.payment_reference = t.payment_reference or row.payment_reference
            row.history.append(t.after)
        self.rules = {
            e: EventRules(
                outcome.available[e],
                r.starts_at,
                r.sales_start_at,
                r.sales_end_at,
                r.max_tickets_per_customer,
                r.hold_seconds,
            )
            for e, r in self.rules.items()
        }
        self.horizon = outcome.horizon

    def check_invariants(self) -> None:
        for event_id, rules in self.rules.items():
            holding = sum(
                r.quantity
                for r in self.rows.values()
                if r.event_id == event_id and r.status in HOLDING
            )
            assert rules.available >= 0
            assert rules.available + holding == self.total[event_id], event_id
            limit = rules.max_tickets_per_customer
            if limit is not None:
                per_customer: dict[str, int] = defaultdict(int)
                for r in self.rows.values():
                    if r.event_id == event_id and r.status in HOLDING:
                        per_customer[r.customer_id] += r.quantity
                assert all(n <= limit for n in per_customer.values()), per_customer
        for row in self.rows.values():
            assert _legal(row.history), row.history


FOLLOW_ONS = {
    PurchaseStatus.HELD: {
        PurchaseStatus.CONFIRMED,
        PurchaseStatus.EXPIRED,
        PurchaseStatus.CANCELLED,
    },
    PurchaseStatus.CONFIRMED: {PurchaseStatus.CANCELLED},
}


def _legal(history: list[PurchaseStatus]) -> bool:
    """held -> confirmed | expired | cancelled; confirmed -> cancelled; nothing after the rest."""
    return all(b in FOLLOW_ONS.get(a, set()) for a, b in itertools.pairwise(history))


@st.composite
def partitions(draw: st.DrawFn) -> Partition:
    rules, total = {}, {}
    for event_id in EVENTS[:2]:
        tickets = draw(st.integers(0, 8))
        opens = draw(st.none() | st.integers(0, 40).map(lambda s: T0 + timedelta(seconds=s)))
        closes = draw(st.none() | st.integers(41, 200).map(lambda s: T0 + timedelta(seconds=s)))
        rules[event_id] = EventRules(
            available=tickets,
            starts_at=draw(st.sampled_from([FAR, T0 + timedelta(seconds=150)])),
            sales_start_at=opens,
            sales_end_at=closes,
            max_tickets_per_customer=draw(st.none() | st.integers(1, 4)),
            hold_seconds=draw(st.none() | st.just(30)),
        )
        total[event_id] = tickets
    return Partition(rules, total)


@st.composite
def timelines(draw: st.DrawFn) -> list[Command]:
    """Purchases, and confirmations and cancellations of earlier ones (or of an id never
    bought), at increasing acceptance times spread over a few hold lifetimes."""
    at = T0
    commands: list[Command] = []
    bought: list[PurchaseRequested] = []
    for _ in range(draw(st.integers(0, 40))):
        at += timedelta(seconds=draw(st.integers(0, 12)))
        kind = draw(st.sampled_from(["purchase", "purchase", "confirm", "cancel"]))
        command: Command
        if kind == "purchase" or not bought:
            purchase = requested(
                draw(st.sampled_from([*EVENTS[:2], UNKNOWN])),
                draw(st.integers(1, 3)),
                customer=draw(st.sampled_from(["ann", "bob", "cy"])),
                at=at,
            )
            bought.append(purchase)
            command = purchase
        else:
            target = draw(st.sampled_from(bought[::-1]))
            common = {
                "purchase_id": target.purchase_id,
                "event_id": target.event_id,
                "accepted_at": at,
            }
            if kind == "confirm":
                ref = draw(st.sampled_from(["pay-1", "pay-2"]))
                command = ConfirmRequested(payment_reference=ref, **common)
            else:
                command = CancelRequested(**common)
        commands.append(command)
    return commands


def run(partition: Partition, commands: list[Command], cuts: list[int]) -> Partition:
    """Apply `commands` batch by batch, cut at `cuts`, each batch decided a moment after its
    last command was accepted."""
    edges = sorted({min(c, len(commands)) for c in cuts} | {0, len(commands)})
    for start, end in itertools.pairwise(edges):
        batch = commands[start:end]
        partition.apply(batch, batch[-1].accepted_at + timedelta(milliseconds=50))
        partition.check_invariants()
    return partition


cut_lists = st.lists(st.integers(0, 40), max_size=6)


@LIFECYCLE
@given(partitions(), timelines(), cut_lists)
def test_every_lifecycle_keeps_tickets_limits_and_transitions_in_order(
    partition: Partition, commands: list[Command], cuts: list[int]
) -> None:
    """available + held + confirmed = total, never below zero; no customer past the limit;
    held -> confirmed/expired/cancelled, confirmed -> cancelled, nothing after the rest. After
    every batch, however the stream is cut, and once the queue is drained long after."""
    run(partition, commands, cuts)
    end = commands[-1].accepted_at if commands else T0
    partition.apply([], end + timedelta(hours=1), drained=True)
    partition.check_invariants()
    assert all(r.status != PurchaseStatus.HELD for r in partition.rows.values()), (
        "a hold outlived a drained queue an hour past its end"
    )


@LIFECYCLE
@given(partitions(), timelines(), cut_lists)
def test_where_a_stream_is_cut_into_batches_changes_nothing_but_when_holds_end(
    partition: Partition, commands: list[Command], cuts: list[int]
) -> None:
    """A hold ends hold_seconds after it is given, and it is given when its batch is decided:
    that depends on the batching. Everything else must not."""
    partition.rules = {e: replace(r, hold_seconds=None) for e, r in partition.rules.items()}
    whole = run(Partition(dict(partition.rules), dict(partition.total)), commands, [])
    cut = run(partition, commands, cuts)
    assert {p: r.status for p, r in cut.rows.items()} == {
        p: r.status for p, r in whole.rows.items()
    }


def paid(target: PurchaseRequested, at: datetime, reference: str = "psp-1") -> ConfirmRequested:
    """The confirmation of `target`'s hold, as the API accepted it at `at`."""
    return ConfirmRequested(
        purchase_id=target.purchase_id,
        event_id=target.event_id,
        payment_reference=reference,
        accepted_at=at,
    )


def _paid_late_and_cancelled() -> tuple[Partition, list[Command], list[int]]:
    """One hold paid in time, one paid just after its end (within CONFIRM_MARGIN, so it is
    still held when the confirmation is applied), one cancelled before it was paid. The
    generated examples rarely confirm a hold: none of make test's fixed set does."""
    event = EVENTS[0]
    on_time, late, dropped = (requested(event, 1, at=T0 + timedelta(seconds=s)) for s in (0, 1, 2))
    # Decided as one batch a moment after the last of them: every hold ends at the same time.
    hold_end = T0 + timedelta(seconds=2, milliseconds=50) + timedelta(seconds=30)

    commands: list[Command] = [
        on_time,
        late,
        dropped,
        CancelRequested(
            purchase_id=dropped.purchase_id, event_id=event, accepted_at=T0 + timedelta(seconds=3)
        ),
        paid(dropped, T0 + timedelta(seconds=4), "p"),
        paid(on_time, hold_end - timedelta(milliseconds=1), "p"),
        paid(late, hold_end + CONFIRM_MARGIN / 2, "p"),
    ]
    rules = EventRules(available=5, starts_at=FAR, hold_seconds=30)
    return Partition({event: rules}, {event: 5}), commands, [3, 5]


@LIFECYCLE
@example(*_paid_late_and_cancelled())
@given(partitions(), timelines(), cut_lists)
def test_a_confirmation_confirms_a_hold_iff_it_was_accepted_before_the_holds_end(
    partition: Partition, commands: list[Command], cuts: list[int]
) -> None:
    """Both ways: a hold confirmed had its first confirmation accepted before its end, and a
    hold whose first confirmation was accepted before its end is confirmed (unless a cancel got
    there first). Half of it would pass a decision that never confirms anything."""
    run(partition, commands, cuts)
    firsts: dict[UUID, ConfirmRequested] = {}
    for c in commands:
        if isinstance(c, ConfirmRequested):
            firsts.setdefault(c.purchase_id, c)
    for purchase_id, row in partition.rows.items():
        if row.history[0] != PurchaseStatus.HELD or row.history[1:2] == [PurchaseStatus.CANCELLED]:
            continue  # never held, or cancelled while held: no confirmation could apply
        assert row.hold_expires_at is not None
        confirm = firsts.get(purchase_id)
        in_time = confirm is not None and confirm.accepted_at < row.hold_expires_at
        assert (PurchaseStatus.CONFIRMED in row.history) == in_time, (row.history, confirm)
        if confirm is not None and in_time:
            assert row.payment_reference == confirm.payment_reference


# --- examples of the lifecycle -----------------------------------------------------------------


def held_event(tickets: int, **rules: object) -> EventRules:
    return EventRules(available=tickets, starts_at=FAR, hold_seconds=30, **rules)  # type: ignore[arg-type]


def test_a_held_purchase_confirmed_in_time_is_confirmed_with_its_reference() -> None:
    event = EVENTS[0]
    p = Partition({event: held_event(2)}, {event: 2})
    buy = requested(event, 2, at=T0)
    p.apply([buy], T0)
    assert p.rows[buy.purchase_id].status == PurchaseStatus.HELD
    assert p.rows[buy.purchase_id].hold_expires_at == T0 + timedelta(seconds=30)
    confirm = paid(buy, T0 + timedelta(seconds=29))
    # Decided well after the hold's end: what counts is when the API accepted it.
    p.apply([confirm], T0 + timedelta(seconds=45))
    row = p.rows[buy.purchase_id]
    assert (row.status, row.payment_reference) == (PurchaseStatus.CONFIRMED, "psp-1")
    assert p.rules[event].available == 0


def test_a_confirmation_accepted_at_the_holds_end_expires_the_purchase() -> None:
    event = EVENTS[0]
    p = Partition({event: held_event(1)}, {event: 1})
    buy = requested(event, 1, at=T0)
    p.apply([buy], T0)
    late = paid(buy, T0 + timedelta(seconds=30))
    p.apply([late], T0 + timedelta(seconds=30))
    assert p.rows[buy.purchase_id].status == PurchaseStatus.EXPIRED
    assert p.rules[event].available == 1


def test_an_expired_ticket_goes_to_the_first_later_purchase_that_asks() -> None:
    event = EVENTS[0]
    p = Partition({event: held_event(1)}, {event: 1})
    first = requested(event, 1, customer="ann", at=T0)
    p.apply([first], T0)
    too_soon = requested(event, 1, customer="bob", at=T0 + timedelta(seconds=20))
    after = T0 + timedelta(seconds=30) + CONFIRM_MARGIN + timedelta(seconds=1)
    later = requested(event, 1, customer="cy", at=after)
    even_later = requested(event, 1, customer="dan", at=after + timedelta(seconds=1))
    p.apply([too_soon, later, even_later], after + timedelta(seconds=2))
    statuses = [p.rows[c.purchase_id].status for c in (first, too_soon, later, even_later)]
    assert statuses == [
        PurchaseStatus.EXPIRED,
        PurchaseStatus.REJECTED,
        PurchaseStatus.HELD,
        PurchaseStatus.REJECTED,
    ]


def test_a_hold_does_not_expire_before_the_horizon_passes_its_end_by_the_margin() -> None:
    event = EVENTS[0]
    p = Partition({event: held_event(1)}, {event: 1})
    buy = requested(event, 1, at=T0)
    p.apply([buy], T0)
    # Not drained: only acceptance times move the horizon, and none is past the margin yet.
    p.apply([], T0 + timedelta(minutes=5))
    assert p.rows[buy.purchase_id].status == PurchaseStatus.HELD
    p.apply([], T0 + timedelta(minutes=5), drained=True)
    assert p.rows[buy.purchase_id].status == PurchaseStatus.EXPIRED
    assert p.rows[buy.purchase_id].history == [PurchaseStatus.HELD, PurchaseStatus.EXPIRED]


def test_a_hold_kept_for_its_confirmation_never_expires_and_the_confirmation_confirms_it() -> None:
    """Its confirmation was answered 202 in time, then left the queue unapplied (dead-lettered):
    however drained the queue and late the clock, the hold and its ticket stay until it is
    replayed."""
    event = EVENTS[0]
    p = Partition({event: held_event(1)}, {event: 1})
    buy = requested(event, 1, at=T0)
    p.apply([buy], T0)
    p.rows[buy.purchase_id].hold_kept = True
    later = T0 + timedelta(minutes=5)
    other = requested(event, 1, customer="other", at=later)
    p.apply([other], later, drained=True)
    assert p.rows[buy.purchase_id].status == PurchaseStatus.HELD
    assert p.rows[other.purchase_id].status == PurchaseStatus.REJECTED
    assert p.rules[event].available == 0
    replayed = paid(buy, T0 + timedelta(seconds=29))
    p.apply([replayed], later + timedelta(minutes=1), drained=True)
    row = p.rows[buy.purchase_id]
    assert (row.status, row.payment_reference) == (PurchaseStatus.CONFIRMED, "psp-1")
    assert p.rules[event].available == 0


def test_a_hold_kept_for_its_confirmation_can_still_be_cancelled() -> None:
    event = EVENTS[0]
    p = Partition({event: held_event(1)}, {event: 1})
    buy = requested(event, 1, at=T0)
    p.apply([buy], T0)
    p.rows[buy.purchase_id].hold_kept = True
    later = T0 + timedelta(minutes=5)
    cancel = CancelRequested(purchase_id=buy.purchase_id, event_id=event, accepted_at=later)
    p.apply([cancel], later, drained=True)
    assert p.rows[buy.purchase_id].status == PurchaseStatus.CANCELLED
    assert p.rules[event].available == 1


def test_a_cancel_gives_tickets_back_and_a_rejected_purchase_stays_rejected() -> None:
    event = EVENTS[0]
    p = Partition({event: EventRules(available=1, starts_at=FAR)}, {event: 1})
    a, b = requested(event, 1, at=T0), requested(event, 1, at=T0)
    cancel_a = CancelRequested(purchase_id=a.purchase_id, event_id=event, accepted_at=T0)
    cancel_b = CancelRequested(purchase_id=b.purchase_id, event_id=event, accepted_at=T0)
    p.apply([a, b, cancel_a, cancel_b], T0)
    assert [p.rows[c.purchase_id].status for c in (a, b)] == [
        PurchaseStatus.CANCELLED,
        PurchaseStatus.REJECTED,
    ]
    assert p.rules[event].available == 1


def test_no_cancellation_once_the_event_has_started() -> None:
    event = EVENTS[0]
    starts = T0 + timedelta(hours=1)
    p = Partition({event: EventRules(available=1, starts_at=starts)}, {event: 1})
    buy = requested(event, 1, at=T0)
    late = CancelRequested(purchase_id=buy.purchase_id, event_id=event, accepted_at=starts)
    p.apply([buy, late], starts)
    assert p.rows[buy.purchase_id].status == PurchaseStatus.CONFIRMED


def test_the_per_customer_limit_counts_held_and_confirmed_across_purchases() -> None:
    event = EVENTS[0]
    rules = EventRules(available=10, starts_at=FAR, max_tickets_per_customer=3, hold_seconds=30)
    p = Partition({event: rules}, {event: 10})
    buys = [requested(event, q, customer="ann", at=T0) for q in (2, 2, 1)]
    other = requested(event, 3, customer="bob", at=T0)
    p.apply([*buys, other], T0)
    assert [p.rows[b.purchase_id].status for b in [*buys, other]] == [
        PurchaseStatus.HELD,
        PurchaseStatus.REJECTED,
        PurchaseStatus.HELD,
        PurchaseStatus.HELD,
    ]
    rejected = p.rows[buys[1].purchase_id]
    assert rejected.status == PurchaseStatus.REJECTED
    # An expiry stops counting: ann may buy again once her holds are gone.
    after = T0 + timedelta(minutes=2)
    again = requested(event, 3, customer="ann", at=after)
    p.apply([again], after)
    assert p.rows[again.purchase_id].status == PurchaseStatus.HELD


def test_the_sales_window_is_checked_against_when_the_api_accepted_the_purchase() -> None:
    event = EVENTS[0]
    opens, closes = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    rules = EventRules(available=5, starts_at=FAR, sales_start_at=opens, sales_end_at=closes)
    p = Partition({event: rules}, {event: 5})
    early = requested(event, 1, at=opens - timedelta(seconds=1))
    on_time = requested(event, 1, at=opens)
    late = requested(event, 1, at=closes)
    p.apply([early, on_time, late], closes + timedelta(hours=1))
    assert [p.rows[c.purchase_id].status for c in (early, on_time, late)] == [
        PurchaseStatus.REJECTED,
        PurchaseStatus.CONFIRMED,
        PurchaseStatus.REJECTED,
    ]
    decided = decide({event: rules}, {}, {}, [early, late], now=closes)
    assert [d.reason for d in decided.decisions] == [
        RejectReason.SALES_NOT_OPEN,
        RejectReason.SALES_CLOSED,
    ]


def test_an_expiry_is_recorded_with_its_reason() -> None:
    event = EVENTS[0]
    buy = requested(event, 1, at=T0)
    held = Recorded(buy.purchase_id, event, "c", 1, PurchaseStatus.HELD, T0 + timedelta(seconds=30))
    outcome = decide(
        {event: held_event(0)},
        {buy.purchase_id: held},
        {},
        [],
        now=T0 + timedelta(minutes=1),
        drained=True,
    )
    assert [(t.after, t.reason) for t in outcome.transitions] == [
        (PurchaseStatus.EXPIRED, ExpireReason.HOLD_EXPIRED)
    ]
    assert outcome.available == {event: 1}


def test_a_purchase_above_the_events_per_purchase_limit_when_decided_is_rejected() -> None:
    """The API checks the limit against its event cache, which may not yet know a lower one
    (a PATCH a moment before): the worker checks it again with the locked row."""
    event = EVENTS[0]
    rules = EventRules(available=10, starts_at=FAR, max_tickets_per_purchase=2)
    within, above = requested(event, 2, at=T0), requested(event, 3, at=T0)

    outcome = decide({event: rules}, {}, {}, [within, above], now=T0)

    assert [(d.status, d.reason) for d in outcome.decisions] == [
        (PurchaseStatus.CONFIRMED, None),
        (PurchaseStatus.REJECTED, RejectReason.PURCHASE_LIMIT),
    ]
    assert outcome.available == {event: 8}
