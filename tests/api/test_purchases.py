"""Purchases over HTTP: the 202 only after the broker confirmed, proven by reading the message back
from the real partition queue; the refusals (404, 409, 422, 503); and the status endpoint."""

import asyncio
from datetime import datetime
from uuid import UUID, uuid4

import aio_pika
import aio_pika.abc
import asyncpg
import httpx
import pytest

from shared.messages import CONTENT_TYPE, MESSAGE_TYPE, PurchaseMessage
from shared.purchases.models import PurchaseAccepted
from shared.settings import Settings
from tests.api.helpers import (
    assert_problem,
    partition_queue,
    purchases_in,
    queue_depth,
    read_messages,
    total_depth,
)
from tests.conftest import StartWorker, api_client
from tests.factories import create_event, purchase, wait_until_final

PURCHASE_FIELDS = {
    "purchase_id",
    "event_id",
    "customer_id",
    "quantity",
    "status",
    "reason",
    "accepted_at",
    "processed_at",
    "hold_expires_at",
    "confirmed_at",
    "cancelled_at",
    "payment_reference",
    "queue",
}


async def test_purchase_is_202_pending_with_location_and_retry_after(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api, max_tickets_per_purchase=4)

    response = await purchase(api, event["id"], quantity=3, customer_id="customer-42")

    assert response.status_code == 202, response.text
    accepted = response.json()
    assert set(accepted) == {
        "purchase_id",
        "event_id",
        "customer_id",
        "quantity",
        "status",
        "status_url",
    }
    purchase_id = UUID(accepted["purchase_id"])
    assert accepted["event_id"] == event["id"]
    assert accepted["customer_id"] == "customer-42"
    assert accepted["quantity"] == 3
    assert accepted["status"] == "pending"
    assert accepted["status_url"] == f"/purchases/{purchase_id}"
    assert response.headers["location"] == f"/purchases/{purchase_id}"
    assert response.headers["retry-after"] == "1"
    # The body is the documented response model, field for field.
    model = PurchaseAccepted.model_validate_json(response.content)
    assert model.model_dump(mode="json") == accepted


async def test_purchase_message_is_in_its_partition_queue_when_202_is_answered(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api, max_tickets_per_purchase=5)
    partition, queue = partition_queue(settings, event["id"])

    response = await purchase(api, event["id"], quantity=5, customer_id="customer-7")

    assert response.status_code == 202, response.text
    # No wait: the 202 is sent only after the broker confirmed, so the message is there now.
    assert await queue_depth(amqp, queue) == 1
    assert await total_depth(amqp, settings) == 1  # in this partition's queue and no other
    [message] = await read_messages(amqp, queue, 1)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert int(message.delivery_mode) == 2  # persistent, in AMQP terms
    assert message.content_type == CONTENT_TYPE
    assert message.type == MESSAGE_TYPE
    decoded = PurchaseMessage.from_body(message.body)
    assert decoded.partition == partition
    [published] = decoded.purchases
    assert str(published.purchase_id) == response.json()["purchase_id"]
    assert str(published.event_id) == event["id"]
    assert published.customer_id == "customer-7"
    assert published.quantity == 5
    assert published.accepted_at.tzinfo is not None


async def test_purchases_of_one_event_are_queued_in_the_order_they_were_accepted(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api, max_tickets_per_purchase=10)
    _, queue = partition_queue(settings, event["id"])
    accepted: list[str] = []
    for i in range(6):
        response = await purchase(
            api, event["id"], quantity=(i % 3) + 1, customer_id=f"customer-{i}"
        )
        assert response.status_code == 202, response.text
        accepted.append(response.json()["purchase_id"])

    assert await queue_depth(amqp, queue) == 6  # sequential requests: one message each
    queued = purchases_in(await read_messages(amqp, queue, 6))

    assert [str(p.purchase_id) for p in queued] == accepted
    assert [p.customer_id for p in queued] == [f"customer-{i}" for i in range(6)]
    assert [p.quantity for p in queued] == [1, 2, 3, 1, 2, 3]
    times = [p.accepted_at for p in queued]
    assert times == sorted(times)


async def test_concurrent_purchases_of_one_event_are_coalesced_in_acceptance_order(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api, max_tickets_per_purchase=10)
    _, queue = partition_queue(settings, event["id"])

    responses = await asyncio.gather(
        *(purchase(api, event["id"], customer_id=f"customer-{i}") for i in range(60))
    )

    assert [r.status_code for r in responses] == [202] * 60
    messages = await queue_depth(amqp, queue)
    # While one message awaits its confirm, the purchases arriving meanwhile share the next.
    assert messages < 60, "concurrent purchases of one partition were not coalesced"
    queued = purchases_in(await read_messages(amqp, queue, messages))
    assert sorted(str(p.purchase_id) for p in queued) == sorted(
        r.json()["purchase_id"] for r in responses
    ), "every accepted purchase is queued exactly once"
    times = [p.accepted_at for p in queued]
    assert times == sorted(times), "the queue holds purchases in the order they were accepted"


async def test_purchases_of_different_events_go_to_each_events_partition(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    events = [await create_event(api, name=f"E{i}") for i in range(6)]
    expected: dict[str, list[str]] = {}
    for event in events:
        response = await purchase(api, event["id"])
        assert response.status_code == 202
        _, queue = partition_queue(settings, event["id"])
        expected.setdefault(queue, []).append(event["id"])

    for queue, event_ids in expected.items():
        assert await queue_depth(amqp, queue) == len(event_ids)
        queued = purchases_in(await read_messages(amqp, queue, len(event_ids)))
        assert [str(p.event_id) for p in queued] == event_ids


async def test_purchase_of_unknown_event_is_404_and_publishes_nothing(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    unknown = uuid4()

    response = await purchase(api, unknown)

    problem = assert_problem(response, 404)
    assert str(unknown) in problem["detail"]
    assert await total_depth(amqp, settings) == 0


async def test_purchase_of_sold_out_event_is_409_and_publishes_nothing(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
) -> None:
    event = await create_event(api, total_tickets=5)
    await db.execute("UPDATE events SET available_tickets = 0 WHERE id = $1", UUID(event["id"]))

    response = await purchase(api, event["id"])

    problem = assert_problem(response, 409)
    assert problem["title"] == "Sold out"
    assert await total_depth(amqp, settings) == 0


async def test_purchase_above_the_events_max_per_purchase_is_422_and_publishes_nothing(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api, max_tickets_per_purchase=4)

    at_limit = await purchase(api, event["id"], quantity=4)
    over = await purchase(api, event["id"], quantity=5)

    assert at_limit.status_code == 202, at_limit.text
    problem = assert_problem(over, 422)
    assert "4" in problem["detail"]
    # Located as a validation error is, so that a page shows it beside the field.
    assert problem["errors"] == [
        {"loc": ["body", "quantity"], "msg": problem["detail"], "type": "value_error"}
    ]
    _, queue = partition_queue(settings, event["id"])
    assert await queue_depth(amqp, queue) == 1


async def test_purchase_limit_follows_a_lowered_max_tickets_per_purchase(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api, max_tickets_per_purchase=10)
    patched = await api.patch(f"/events/{event['id']}", json={"max_tickets_per_purchase": 2})
    assert patched.status_code == 200

    assert_problem(await purchase(api, event["id"], quantity=3), 422)
    assert (await purchase(api, event["id"], quantity=2)).status_code == 202


async def test_purchase_of_deleted_event_is_404(api: httpx.AsyncClient) -> None:
    event = await create_event(api)
    assert (await api.delete(f"/events/{event['id']}")).status_code == 204

    assert_problem(await purchase(api, event["id"]), 404)


# --- a full partition queue: the broker nacks, the API answers 503 --------------------------


@pytest.mark.parametrize("settings", [{"queue_max_length": 1}], indirect=True)
async def test_purchase_into_a_full_queue_is_503_with_retry_after_and_loses_nothing(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api)
    _, queue = partition_queue(settings, event["id"])
    accepted: list[str] = []
    refused: httpx.Response | None = None
    # A few extra attempts keep this test about the 503 itself; the exact length has its own test.
    for _ in range(settings.queue_max_length + 3):
        response = await purchase(api, event["id"])
        if response.status_code != 202:
            refused = response
            break
        accepted.append(response.json()["purchase_id"])

    assert refused is not None, "the full queue never refused a purchase"
    assert_problem(refused, 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert len(accepted) >= settings.queue_max_length
    # Still full: the next one is refused too.
    assert_problem(await purchase(api, event["id"]), 503)
    # Every 202 is in the queue, the refused ones are not, and refusing did not drop the head.
    # (Read last: messages delivered to a consumer no longer count toward the length limit.)
    assert await queue_depth(amqp, queue) == len(accepted)
    queued = purchases_in(await read_messages(amqp, queue, len(accepted)))
    assert [str(p.purchase_id) for p in queued] == accepted


@pytest.mark.parametrize("settings", [{"queue_max_length": 1}], indirect=True)
async def test_second_purchase_into_a_queue_of_length_1_is_503_and_only_one_is_queued(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api)
    _, queue = partition_queue(settings, event["id"])

    first = await purchase(api, event["id"])
    second = await purchase(api, event["id"])

    assert first.status_code == 202, first.text
    assert await queue_depth(amqp, queue) == 1
    assert_problem(second, 503)
    assert "retry-after" in second.headers


@pytest.mark.parametrize("settings", [{"queue_max_length": 1}], indirect=True)
async def test_a_full_partition_does_not_refuse_purchases_of_other_partitions(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    full = await create_event(api, name="Hot")
    full_partition, _ = partition_queue(settings, full["id"])
    other = await create_event(api, name="Quiet")
    while partition_queue(settings, other["id"])[0] == full_partition:
        other = await create_event(api, name="Quiet")
    for _ in range(settings.queue_max_length + 3):
        if (await purchase(api, full["id"])).status_code == 503:
            break
    else:
        pytest.fail("the hot partition never filled up")

    response = await purchase(api, other["id"])

    assert response.status_code == 202, response.text


# --- status ---------------------------------------------------------------------------------


async def test_status_of_a_just_accepted_purchase_is_pending_with_retry_after(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api)
    accepted = (await purchase(api, event["id"], quantity=2, customer_id="c-9")).json()

    response = await api.get(accepted["status_url"])

    assert response.status_code == 200, response.text
    status = response.json()
    assert set(status) == PURCHASE_FIELDS
    assert status["purchase_id"] == accepted["purchase_id"]
    assert status["status"] == "pending"
    assert status["event_id"] == event["id"]
    assert status["customer_id"] == "c-9"
    assert status["quantity"] == 2
    assert status["reason"] is None
    assert status["processed_at"] is None
    assert datetime.fromisoformat(status["accepted_at"]).tzinfo is not None
    assert response.headers["retry-after"] == "1"


async def test_status_of_an_issued_id_is_pending_on_another_replica_not_404(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    event = await create_event(api)
    accepted = (await purchase(api, event["id"])).json()

    # A second API process with the same secret has never seen this purchase.
    async with api_client(settings) as other_replica:
        response = await other_replica.get(accepted["status_url"])

    assert response.status_code == 200, response.text
    status = response.json()
    assert status["purchase_id"] == accepted["purchase_id"]
    assert status["status"] == "pending"
    assert response.headers["retry-after"] == "1"


async def test_status_of_a_random_uuid4_is_404(api: httpx.AsyncClient) -> None:
    unknown = uuid4()

    response = await api.get(f"/purchases/{unknown}")

    problem = assert_problem(response, 404)
    assert str(unknown) in problem["detail"]


async def test_status_of_a_tampered_purchase_id_is_404(api: httpx.AsyncClient) -> None:
    event = await create_event(api)
    issued = UUID((await purchase(api, event["id"])).json()["purchase_id"])
    tampered = UUID(bytes=issued.bytes[:15] + bytes([issued.bytes[15] ^ 0x01]))

    assert_problem(await api.get(f"/purchases/{tampered}"), 404)


@pytest.mark.parametrize("purchase_id", ["abc", "1", "%00", "z" * 36, "0" * 300])
async def test_status_with_malformed_id_is_422(api: httpx.AsyncClient, purchase_id: str) -> None:
    assert_problem(await api.get(f"/purchases/{purchase_id}"), 422)


async def test_purchase_becomes_confirmed_once_a_worker_decides_it(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=10, max_tickets_per_purchase=4)
    accepted = (await purchase(api, event["id"], quantity=3, customer_id="buyer")).json()

    await start_worker()
    await wait_until_final(db, [accepted["purchase_id"]], timeout_s=20)
    response = await api.get(accepted["status_url"])

    assert response.status_code == 200
    status = response.json()
    assert status["status"] == "confirmed"
    assert status["reason"] is None
    assert (status["event_id"], status["customer_id"], status["quantity"]) == (
        event["id"],
        "buyer",
        3,
    )
    assert datetime.fromisoformat(status["processed_at"]) >= datetime.fromisoformat(
        status["accepted_at"]
    )
    assert "retry-after" not in response.headers
    assert (await api.get(f"/events/{event['id']}")).json()["available_tickets"] == 7
