"""The decision rules (`worker.decision.decide`): first come, first served, never below zero, never
more than asked, the right reason for every rejection. Pure, so hypothesis explores it freely."""

from collections import defaultdict
from datetime import UTC, datetime
from uuid import UUID, uuid4

from hypothesis import given
from hypothesis import strategies as st

from shared.messages import PurchaseRequested
from shared.purchases.models import Decision, PurchaseStatus, RejectReason
from tests.fuzzing import property_settings
from worker.decision import decide

EVENTS = [UUID(int=n + 1) for n in range(4)]
UNKNOWN = UUID(int=999)
ACCEPTED_AT = datetime(2027, 1, 1, tzinfo=UTC)

PROPERTY = property_settings(max_examples=300)


def requested(event_id: UUID, quantity: int, purchase_id: UUID | None = None) -> PurchaseRequested:
    return PurchaseRequested(
        purchase_id=purchase_id or uuid4(),
        event_id=event_id,
        customer_id="customer",
        quantity=quantity,
        accepted_at=ACCEPTED_AT,
    )


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


def summary(decisions: list[Decision]) -> list[tuple[UUID, PurchaseStatus, RejectReason | None]]:
    return [(o.purchase.purchase_id, o.status, o.reason) for o in decisions]


@PROPERTY
@given(availability, purchase_lists)
def test_availability_never_goes_negative_nor_above_what_it_was(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    left, _ = decide(available, purchases)
    assert set(left) == set(available), "events appeared or vanished"
    for event_id, tickets in left.items():
        assert 0 <= tickets <= available[event_id]


@PROPERTY
@given(availability, purchase_lists)
def test_confirmed_tickets_equal_exactly_what_availability_lost(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    left, decisions = decide(available, purchases)
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
    _, decisions = decide(available, purchases)
    assert [o.purchase for o in decisions] == purchases


@PROPERTY
@given(availability, purchase_lists)
def test_each_purchase_is_confirmed_iff_it_fits_in_what_earlier_purchases_left(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    """First come, first served, with the reason of every rejection: walk the purchases in order
    keeping what each event has left; a purchase gets its tickets exactly when they fit."""
    _, decisions = decide(available, purchases)
    remaining = dict(available)
    for decision in decisions:
        event_id, quantity = decision.purchase.event_id, decision.purchase.quantity
        before = remaining.get(event_id)
        if before is None:
            assert (decision.status, decision.reason) == (
                PurchaseStatus.REJECTED,
                RejectReason.EVENT_NOT_FOUND,
            )
        elif quantity <= before:
            assert (decision.status, decision.reason) == (PurchaseStatus.CONFIRMED, None)
            remaining[event_id] = before - quantity
        elif before == 0:
            assert (decision.status, decision.reason) == (
                PurchaseStatus.REJECTED,
                RejectReason.SOLD_OUT,
            )
        else:
            assert (decision.status, decision.reason) == (
                PurchaseStatus.REJECTED,
                RejectReason.INSUFFICIENT_TICKETS,
            )


@PROPERTY
@given(availability, purchase_lists)
def test_a_later_purchase_never_overtakes_an_earlier_one_of_the_same_event(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    """Once a purchase of q tickets is turned down, no later purchase of that event asking for q or
    more gets tickets; once an event is sold out, every later purchase of it is sold_out."""
    _, decisions = decide(available, purchases)
    smallest_refused: dict[UUID, int] = {}
    sold_out: set[UUID] = set()
    for decision in decisions:
        event_id, quantity = decision.purchase.event_id, decision.purchase.quantity
        if event_id in sold_out:
            assert decision.reason == RejectReason.SOLD_OUT
        if decision.status == PurchaseStatus.CONFIRMED:
            assert quantity < smallest_refused.get(event_id, quantity + 1)
        elif decision.reason in (RejectReason.INSUFFICIENT_TICKETS, RejectReason.SOLD_OUT):
            smallest_refused[event_id] = min(quantity, smallest_refused.get(event_id, quantity))
            if decision.reason == RejectReason.SOLD_OUT:
                sold_out.add(event_id)


@PROPERTY
@given(availability, purchase_lists)
def test_reasons_match_statuses(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    _, decisions = decide(available, purchases)
    for decision in decisions:
        if decision.status == PurchaseStatus.CONFIRMED:
            assert decision.reason is None
        else:
            assert decision.status == PurchaseStatus.REJECTED
            assert isinstance(decision.reason, RejectReason)
        if decision.purchase.event_id not in available:
            assert decision.reason == RejectReason.EVENT_NOT_FOUND


@PROPERTY
@given(availability, purchase_lists, st.integers(min_value=0, max_value=60))
def test_splitting_a_stream_into_batches_anywhere_gives_the_same_decisions(
    available: dict[UUID, int], purchases: list[PurchaseRequested], cut: int
) -> None:
    """The worker decides a partition batch by batch, carrying availability over: where the
    batches happen to be cut must not change any decision."""
    left, decisions = decide(available, purchases)
    cut = min(cut, len(purchases))
    middle, first = decide(available, purchases[:cut])
    final, second = decide(middle, purchases[cut:])
    assert final == left
    assert summary(first + second) == summary(decisions)


@PROPERTY
@given(availability, purchase_lists)
def test_each_event_is_decided_independently_of_the_others(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    left, decisions = decide(available, purchases)
    for event_id in {*available, UNKNOWN}:
        alone = {event_id: available[event_id]} if event_id in available else {}
        own = [p for p in purchases if p.event_id == event_id]
        own_left, own_outcomes = decide(alone, own)
        assert summary(own_outcomes) == summary(
            [o for o in decisions if o.purchase.event_id == event_id]
        )
        if event_id in available:
            assert own_left[event_id] == left[event_id]


@PROPERTY
@given(availability, purchase_lists)
def test_decide_does_not_mutate_its_inputs(
    available: dict[UUID, int], purchases: list[PurchaseRequested]
) -> None:
    available_before, purchases_before = dict(available), list(purchases)
    decide(available, purchases)
    assert available == available_before
    assert purchases == purchases_before


# --- examples ----------------------------------------------------------------------------------


def test_a_smaller_later_purchase_gets_what_a_larger_earlier_one_could_not() -> None:
    event = EVENTS[0]
    purchases = [requested(event, q) for q in (2, 2, 2, 1, 1)]
    left, decisions = decide({event: 5}, purchases)
    assert [(o.status, o.reason) for o in decisions] == [
        (PurchaseStatus.CONFIRMED, None),
        (PurchaseStatus.CONFIRMED, None),
        (PurchaseStatus.REJECTED, RejectReason.INSUFFICIENT_TICKETS),
        (PurchaseStatus.CONFIRMED, None),
        (PurchaseStatus.REJECTED, RejectReason.SOLD_OUT),
    ]
    assert left == {event: 0}


def test_buying_the_last_tickets_exactly_sells_out() -> None:
    event = EVENTS[0]
    left, decisions = decide({event: 3}, [requested(event, 3), requested(event, 1)])
    assert [o.status for o in decisions] == [PurchaseStatus.CONFIRMED, PurchaseStatus.REJECTED]
    assert decisions[1].reason == RejectReason.SOLD_OUT
    assert left == {event: 0}


def test_an_event_with_no_tickets_left_rejects_as_sold_out_not_insufficient() -> None:
    event = EVENTS[0]
    _, decisions = decide({event: 0}, [requested(event, 1), requested(event, 5)])
    assert [o.reason for o in decisions] == [RejectReason.SOLD_OUT, RejectReason.SOLD_OUT]


def test_an_unknown_event_is_rejected_and_left_out_of_availability() -> None:
    known = EVENTS[0]
    left, decisions = decide(
        {known: 2}, [requested(UNKNOWN, 1), requested(known, 1), requested(UNKNOWN, 1)]
    )
    assert [o.reason for o in decisions] == [
        RejectReason.EVENT_NOT_FOUND,
        None,
        RejectReason.EVENT_NOT_FOUND,
    ]
    assert left == {known: 1}


def test_an_empty_batch_changes_nothing() -> None:
    left, decisions = decide({EVENTS[0]: 4}, [])
    assert left == {EVENTS[0]: 4}
    assert decisions == []


def test_events_do_not_share_tickets() -> None:
    a, b = EVENTS[0], EVENTS[1]
    left, decisions = decide({a: 1, b: 1}, [requested(a, 1), requested(a, 1), requested(b, 1)])
    assert [o.status for o in decisions] == [
        PurchaseStatus.CONFIRMED,
        PurchaseStatus.REJECTED,
        PurchaseStatus.CONFIRMED,
    ]
    assert left == {a: 0, b: 0}
