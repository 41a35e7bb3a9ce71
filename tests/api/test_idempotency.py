"""Idempotency-Key: a retried POST is the same purchase, never a second one."""

from collections.abc import Awaitable

import aio_pika.abc
import asyncpg
import httpx
import pytest

from shared.settings import Settings
from tests.api.helpers import (
    assert_problem,
    partition_queue,
    purchases_in,
    queue_depth,
    read_messages,
    wait_for_no_consumers,
)
from tests.conftest import StartWorker
from tests.factories import create_event, purchase, wait_until_final


async def test_same_key_same_customer_same_event_yields_the_same_purchase_id(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api)

    first = await purchase(api, event["id"], quantity=2, idempotency_key="key-1")
    retry = await purchase(api, event["id"], quantity=2, idempotency_key="key-1")

    assert first.status_code == retry.status_code == 202
    assert retry.json()["purchase_id"] == first.json()["purchase_id"]
    assert retry.headers["location"] == first.headers["location"]
    # Not yet recorded, so the retry is published again: both carry the one id, and the worker
    # applies an id once.
    _, queue = partition_queue(settings, event["id"])
    queued = purchases_in(await read_messages(amqp, queue, 2))
    assert {str(p.purchase_id) for p in queued} == {first.json()["purchase_id"]}


async def test_same_key_from_another_customer_yields_a_different_purchase_id(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api)

    alice = await purchase(api, event["id"], customer_id="alice", idempotency_key="shared")
    bob = await purchase(api, event["id"], customer_id="bob", idempotency_key="shared")

    assert alice.status_code == bob.status_code == 202
    assert alice.json()["purchase_id"] != bob.json()["purchase_id"]


async def test_same_key_for_another_event_yields_a_different_purchase_id(
    api: httpx.AsyncClient,
) -> None:
    first_event = await create_event(api, name="One")
    second_event = await create_event(api, name="Two")

    first = await purchase(api, first_event["id"], idempotency_key="shared")
    second = await purchase(api, second_event["id"], idempotency_key="shared")

    assert first.status_code == second.status_code == 202
    assert first.json()["purchase_id"] != second.json()["purchase_id"]


async def test_purchases_without_a_key_get_distinct_ids(api: httpx.AsyncClient) -> None:
    event = await create_event(api)

    ids = {(await purchase(api, event["id"])).json()["purchase_id"] for _ in range(5)}

    assert len(ids) == 5


async def test_an_idempotent_purchase_id_is_a_valid_status_url(api: httpx.AsyncClient) -> None:
    event = await create_event(api)
    accepted = (await purchase(api, event["id"], idempotency_key="status-key")).json()

    response = await api.get(accepted["status_url"])

    assert response.status_code == 200
    assert response.json()["status"] == "pending"


async def record_with_worker(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
    event_id: str,
    *,
    key: str,
    quantity: int,
) -> str:
    """Buy with `key`, let a worker record it, then stop the worker so the queues are observable
    again; return the purchase id."""
    accepted = await purchase(api, event_id, quantity=quantity, idempotency_key=key)
    assert accepted.status_code == 202, accepted.text
    purchase_id: str = accepted.json()["purchase_id"]
    worker = await start_worker()
    rows = await wait_until_final(db, [purchase_id], timeout_s=20)
    assert [row["status"] for row in rows.values()] == ["confirmed"]
    worker.stop()
    await wait_for_no_consumers(amqp, settings)
    return purchase_id


async def test_reusing_a_recorded_key_with_the_same_body_is_202_same_id_and_publishes_nothing(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
) -> None:
    event = await create_event(api, total_tickets=10)
    purchase_id = await record_with_worker(
        api, db, amqp, settings, start_worker, event["id"], key="retry-me", quantity=2
    )
    _, queue = partition_queue(settings, event["id"])
    assert await queue_depth(amqp, queue) == 0

    retry = await purchase(api, event["id"], quantity=2, idempotency_key="retry-me")

    assert retry.status_code == 202, retry.text
    assert retry.json()["purchase_id"] == purchase_id
    assert retry.json()["status"] == "pending"
    assert await queue_depth(amqp, queue) == 0, "a recorded purchase was published again"
    # Control: with no worker running, a new purchase does show up in that queue.
    assert (await purchase(api, event["id"])).status_code == 202
    assert await queue_depth(amqp, queue) == 1
    # And the retry did not sell twice.
    assert (await api.get(f"/events/{event['id']}")).json()["available_tickets"] == 8


async def test_reusing_a_recorded_key_with_a_different_quantity_is_422_and_publishes_nothing(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
) -> None:
    event = await create_event(api, total_tickets=10)
    await record_with_worker(
        api, db, amqp, settings, start_worker, event["id"], key="one-use", quantity=2
    )
    _, queue = partition_queue(settings, event["id"])

    response = await purchase(api, event["id"], quantity=3, idempotency_key="one-use")

    problem = assert_problem(response, 422)
    assert "Idempotency-Key" in problem["title"]
    assert [error["loc"] for error in problem["errors"]] == [["header", "Idempotency-Key"]]
    assert await queue_depth(amqp, queue) == 0


async def test_a_key_of_255_characters_is_accepted(api: httpx.AsyncClient) -> None:
    event = await create_event(api)

    response = await purchase(api, event["id"], idempotency_key="k" * 255)

    assert response.status_code == 202, response.text


async def test_a_key_in_utf_8_is_taken_byte_for_byte(api: httpx.AsyncClient) -> None:
    """HTTP reads a header's bytes as Latin-1: the bytes of a UTF-8 sequence that read as C1
    controls there (the euro sign's 0x82) are no control of the client's."""
    event = await create_event(api)

    def keyed(key: str) -> Awaitable[httpx.Response]:
        return api.post(
            f"/events/{event['id']}/tickets/purchase",
            json={"customer_id": "c", "quantity": 1},
            headers=[(b"content-type", b"application/json"), (b"idempotency-key", key.encode())],
        )

    first, retry, other = await keyed("€-ключ"), await keyed("€-ключ"), await keyed("€-ключи")
    longest, too_long = await keyed("é" * 127 + "k"), await keyed("é" * 128)  # 255, 256 bytes

    assert first.status_code == retry.status_code == other.status_code == 202, first.text
    assert retry.json()["purchase_id"] == first.json()["purchase_id"]
    assert other.json()["purchase_id"] != first.json()["purchase_id"]
    assert longest.status_code == 202, longest.text
    assert "at most 255 bytes" in assert_problem(too_long, 422)["detail"]


@pytest.mark.parametrize("key", ["k" * 256, ""], ids=["256-chars", "empty"])
async def test_a_key_that_is_too_long_or_empty_is_422_and_publishes_nothing(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings, key: str
) -> None:
    event = await create_event(api)

    response = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        json={"customer_id": "c", "quantity": 1},
        headers={"Idempotency-Key": key},
    )

    problem = assert_problem(response, 422)
    assert "Idempotency-Key" in problem["detail"]
    _, queue = partition_queue(settings, event["id"])
    assert await queue_depth(amqp, queue) == 0


def _keyed(*keys: str) -> list[tuple[str, str]]:
    return [("Content-Type", "application/json"), *(("Idempotency-Key", key) for key in keys)]


@pytest.mark.parametrize("keys", [("key-a", "key-b"), ("key-a", "key-a", "key-b")])
async def test_a_key_repeated_with_another_value_is_422_and_publishes_nothing(
    api: httpx.AsyncClient,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    keys: tuple[str, ...],
) -> None:
    """Which key the client meant cannot be told: taking the first, as headers are usually
    read, could make a retry carrying the other one a second purchase."""
    event = await create_event(api)

    response = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        content=b'{"customer_id": "c", "quantity": 1}',
        headers=_keyed(*keys),
    )

    problem = assert_problem(response, 422)
    assert "Idempotency-Key" in problem["detail"]
    assert [error["loc"] for error in problem["errors"]] == [["header", "Idempotency-Key"]]
    _, queue = partition_queue(settings, event["id"])
    assert await queue_depth(amqp, queue) == 0


async def test_a_key_repeated_with_the_same_value_is_that_key(api: httpx.AsyncClient) -> None:
    event = await create_event(api)

    once = await purchase(api, event["id"], customer_id="c", idempotency_key="key-a")
    twice = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        content=b'{"customer_id": "c", "quantity": 1}',
        headers=_keyed("key-a", "key-a"),
    )

    assert once.status_code == twice.status_code == 202, twice.text
    assert twice.json()["purchase_id"] == once.json()["purchase_id"]


async def test_conflicting_keys_are_reported_before_the_body_errors(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api)

    response = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        content=b'{"customer_id": "c", "quantity": 0}',
        headers=_keyed("key-a", "key-b"),
    )

    problem = assert_problem(response, 422)
    assert [error["loc"] for error in problem["errors"]] == [
        ["header", "Idempotency-Key"],
        ["body", "quantity"],
    ]
