"""The message's writer and its model agree: what encode_message writes, the worker reads back
as exactly what was accepted, for any purchase the API can accept."""

from datetime import UTC, datetime, timedelta, timezone
from uuid import uuid4

from hypothesis import given
from hypothesis import strategies as st

from shared.messages import AcceptedPurchase, PurchaseMessage, encode_message
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
)


@property_settings(max_examples=300)
@given(st.integers(0, 1023), st.lists(purchases, min_size=1, max_size=20))
def test_what_encode_message_writes_reads_back_as_what_was_accepted(
    partition: int, accepted: list[AcceptedPurchase]
) -> None:
    message = PurchaseMessage.from_body(encode_message(partition, accepted))

    assert message.version == 1
    assert message.partition == partition
    assert [tuple(p.model_dump().values()) for p in message.purchases] == [
        tuple(a) for a in accepted
    ]


def test_a_message_model_writes_itself_with_the_same_encoder() -> None:
    accepted = AcceptedPurchase(
        purchase_id=uuid4(),
        event_id=uuid4(),
        customer_id="c",
        quantity=2,
        accepted_at=datetime(2027, 1, 1, tzinfo=UTC),
    )
    message = PurchaseMessage.from_body(encode_message(3, [accepted]))

    assert message.to_body() == encode_message(3, [accepted])
