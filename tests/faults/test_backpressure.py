"""A full partition queue refuses publishes: the API answers 503, and what it refused is never
applied, while everything it accepted is."""

import asyncio
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from shared import broker, broker_nodes
from shared.amqp_publish import ConfirmedPublisher
from shared.errors import QueueFull
from shared.publisher import RENEW_CHANNEL_S, PurchasePublisher
from shared.purchases.ids import PurchaseIds
from shared.settings import Settings
from tests.conftest import StartWorker
from tests.factories import accepted_purchase, create_event
from tests.faults.helpers import account, flood, report

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("settings", [{"queue_max_length": 3}], indirect=True)
async def test_full_queue_answers_503_and_refused_purchases_are_never_applied(
    settings: Settings, api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=10_000)
    # No worker yet: the event's partition queue fills up after three messages.
    result = await flood(api, event["id"], count=120, concurrency=12)
    assert result.statuses[503] > 0, "the queue never filled up"
    assert result.accepted, "nothing was accepted before the queue filled"

    await start_worker()
    counts = await account(db, event["id"], result.accepted)
    report("backpressure", result, counts)
    assert counts["lost"] == 0
    assert counts["confirmed"] == counts["accepted"]  # tickets for all: none failed
    assert counts["doubled"] == 0

    # The test knows the secret, so it can name the ids the refused requests would have had.
    ids = PurchaseIds(settings.purchase_id_secret)

    def id_of(key: str) -> UUID:
        return ids.for_idempotency_key(
            event_id=UUID(event["id"]), customer_id=f"customer-{key}", key=key
        )

    # Named as the API names them, or the check below would look for ids no purchase can have
    # and could never fail.
    assert {key: id_of(key) for key in result.accepted} == result.accepted
    refused = [id_of(key) for key in result.refused_keys]
    applied_refused = await db.fetchval(
        "SELECT count(*) FROM purchases WHERE id = ANY($1::uuid[])", refused
    )
    print(f"[backpressure] refused={len(refused)} applied_of_refused={applied_refused}")
    assert applied_refused == 0
    assert counts["rows"] == counts["accepted"]


@pytest.mark.parametrize("settings", [{"queue_max_length": 2}], indirect=True)
async def test_a_nacked_purchase_is_refused_at_once_not_after_a_new_channel_opens(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a nack the publisher moves to a new channel, and opening one may take a while (a
    broker under load). The nacked message's callers are answered first and its slot of the
    window is freed at once; the channel opens meanwhile, and is given up if the publisher
    closes first."""
    connection = await broker_nodes.connect(settings)
    publisher = PurchasePublisher(
        broker.Topology.from_settings(settings), timeout_s=5, max_batch=1, max_in_flight=1
    )
    open_channel = publisher._open_channel
    opening = asyncio.Event()

    async def slow_open(
        connection: AbstractConnection,
    ) -> tuple[AbstractChannel, ConfirmedPublisher]:
        opening.set()
        await asyncio.sleep(3)
        return await open_channel(connection)

    event_id = uuid4()
    loop = asyncio.get_running_loop()
    try:
        await publisher.start(connection)
        await fill(publisher, event_id)
        await asyncio.sleep(RENEW_CHANNEL_S)  # the next nack may ask for a new channel again
        monkeypatch.setattr(publisher, "_open_channel", slow_open)
        started = loop.time()
        # One message at a time: the second waits for the first's slot of the window.
        refused = await asyncio.gather(
            *(publisher.publish(accepted_purchase(event_id, i)) for i in (10, 11)),
            return_exceptions=True,
        )
        answered_s = loop.time() - started
        assert opening.is_set(), "no new channel was asked for after the nack"
    finally:
        started = loop.time()
        await publisher.close()
        closed_s = loop.time() - started
        await connection.close()
    assert [type(error) for error in refused] == [QueueFull, QueueFull], refused
    assert answered_s < 1, f"the nacked purchases were answered after {answered_s:.1f} s"
    assert closed_s < 1, "closing waited for the new channel"


async def fill(publisher: PurchasePublisher, event_id: UUID) -> None:
    """Publish until the event's queue is full (a quorum queue may take one past its limit)."""
    for i in range(10):
        try:
            await publisher.publish(accepted_purchase(event_id, i))
        except QueueFull:
            return
    raise AssertionError("the queue never filled up")
