"""The message's writer and its model agree: what encode_message writes, the worker reads back
as exactly what was accepted, for any purchase the API can accept."""

from datetime import UTC, datetime, timedelta, timezone
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.messages import (
    Accepted,
    AcceptedCancel,
    AcceptedConfirm,
    AcceptedPurchase,
    PurchaseMessage,
    PurchaseRequested,
    encode_message,
)
from shared.text import EARLIEST_INSTANT, LATEST_INSTANT
from tests.fuzzing import property_settings

offsets = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-14 * 60, 14 * 60)
)
instants = st.datetimes(
    min_value=EARLIEST_INSTANT.replace(tzinfo=None) + timedelta(days=1),
    max_value=LATEST_INSTANT.replace(tzinfo=None) - timedelta(days=1),
    timezones=st.one_of(st.just(UTC), offsets),
)
customers = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=100
)
purchases = st.builds(
    AcceptedPurchase,
    purchase_id=st.uuids(),
    event_id=st.uuids(),
    customer_id=customers,
    quantity=st.integers(1, 100),
    accepted_at=instants,
    kind=st.just("purchase"),
)
confirms = st.builds(
    AcceptedConfirm,
    purchase_id=st.uuids(),
    event_id=st.uuids(),
    payment_reference=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=200
    ),
    accepted_at=instants,
    kind=st.just("confirm"),
)
cancels = st.builds(
    AcceptedCancel,
    purchase_id=st.uuids(),
    event_id=st.uuids(),
    accepted_at=instants,
    kind=st.just("cancel"),
)


@property_settings(max_examples=300)
@given(
    st.integers(0, 1023), st.lists(st.one_of(purchases, confirms, cancels), min_size=1, max_size=20)
)
def test_what_encode_message_writes_reads_back_as_what_was_accepted(
    partition: int, accepted: list[Accepted]
) -> None:
    message = PurchaseMessage.from_body(encode_message(partition, accepted))

    assert message.version == 2
    assert message.partition == partition
    assert [c.kind for c in message.commands] == [a.kind for a in accepted]
    for command, sent in zip(message.commands, accepted, strict=True):
        assert command.model_dump() == sent._asdict()


def test_a_version_1_message_reads_as_purchases() -> None:
    """Workers upgrade first: a message from an API replica not yet upgraded still reads."""
    purchase_id, event_id = uuid4(), uuid4()
    body = (
        b'{"version":1,"partition":2,"purchases":[{"purchase_id":"%s","event_id":"%s",'
        b'"customer_id":"c","quantity":3,"accepted_at":"2027-01-01T00:00:00Z"}]}'
        % (str(purchase_id).encode(), str(event_id).encode())
    )
    message = PurchaseMessage.from_body(body)

    assert message.version == 1
    assert message.partition == 2
    assert message.purchases == [
        PurchaseRequested(
            purchase_id=purchase_id,
            event_id=event_id,
            customer_id="c",
            quantity=3,
            accepted_at=datetime(2027, 1, 1, tzinfo=UTC),
        )
    ]


def test_a_command_of_an_unknown_kind_does_not_read() -> None:
    body = (
        b'{"version":2,"partition":0,"commands":[{"kind":"refund","purchase_id":"%s",'
        b'"event_id":"%s","accepted_at":"2027-01-01T00:00:00Z"}]}'
        % (str(uuid4()).encode(), str(uuid4()).encode())
    )
    with pytest.raises(ValidationError):
        PurchaseMessage.from_body(body)


def test_a_decoded_message_is_written_back_to_the_same_bytes() -> None:
    accepted = AcceptedPurchase(
        purchase_id=uuid4(),
        event_id=uuid4(),
        customer_id="c",
        quantity=2,
        accepted_at=datetime(2027, 1, 1, tzinfo=UTC),
    )
    message = PurchaseMessage.from_body(encode_message(3, [accepted]))

    assert encode_message(message.partition, message.commands) == encode_message(3, [accepted])
