"""A confirmation answered 202 before its hold's end confirms the hold, even when its message
leaves the queue unapplied: dead-lettered after its consumers died holding it, the hold is kept
(its ticket not resold) until the dead letter is replayed, and then it confirms. Against the real
broker's delivery limit and dead-lettering, with the invariants checked in SQL."""

import io
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import httpx
import pytest

from shared import broker
from shared.messages import ConfirmRequested, PurchaseRequested, encode_message
from shared.purchases import repository as purchases
from shared.purchases.repository import final_purchase_ids
from shared.settings import Settings
from tests.api.helpers import wait_for_no_consumers
from tests.conftest import StartWorker
from tests.factories import assert_no_oversell, create_event, purchase, wait_until_final
from tests.worker.helpers import (
    create_event_in_partition,
    publish_raw,
    take_and_die,
    wait_for,
    wait_queue_depth,
)
from worker import admin, leases
from worker.dead_letters import DeadLetterRecorder
from worker.leases import Lease
from worker.processor import apply_batch

# Long enough for a worker to stop, the confirmation to die twice and a worker to start again
# before the hold ends.
HOLD_S = 10


async def buy_held(
    api: httpx.AsyncClient, db: asyncpg.Pool, event_id: str, customer_id: str = "payer"
) -> asyncpg.Record:
    bought = await purchase(api, event_id, customer_id=customer_id)
    assert bought.status_code == 202, bought.text
    purchase_id = UUID(bought.json()["purchase_id"])
    row = (await wait_until_final(db, [purchase_id]))[purchase_id]
    assert row["status"] == "held"
    return row


async def purchase_row(db: asyncpg.Pool, purchase_id: UUID) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM purchases WHERE id = $1", purchase_id)
    assert row is not None
    return row


async def is_kept(db: asyncpg.Pool, purchase_id: UUID) -> bool:
    since = await db.fetchval("SELECT hold_kept_since FROM purchases WHERE id = $1", purchase_id)
    return since is not None


async def has_status(db: asyncpg.Pool, purchase_id: UUID, status: str) -> bool:
    found = await db.fetchval("SELECT status FROM purchases WHERE id = $1", purchase_id)
    return bool(found == status)


async def available(db: asyncpg.Pool, event_id: str) -> int:
    tickets: int = await db.fetchval(
        "SELECT available_tickets FROM events WHERE id = $1", UUID(event_id)
    )
    return tickets


async def held_event(api: httpx.AsyncClient, db: asyncpg.Pool, *, tickets: int = 1) -> str:
    """An event whose holds last HOLD_S (shorter than the API allows)."""
    event = await create_event(api, total_tickets=tickets, hold_seconds=30)
    await db.execute("UPDATE events SET hold_seconds = $2 WHERE id = $1", UUID(event["id"]), HOLD_S)
    return str(event["id"])


async def partition_lease(db: asyncpg.Pool) -> Lease:
    """Partition 0's lease, for applying batches directly."""
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        acquired = await leases.acquire(conn, 0, "direct", 30)
    assert acquired is not None
    return Lease(0, "direct", acquired.epoch)


def bought_and_paid(
    event_id: str, *, quantity: int = 1, paid_at: datetime | None = None
) -> tuple[PurchaseRequested, ConfirmRequested]:
    """A purchase by "payer", and its confirmation (accepted at `paid_at`, else now)."""
    now = datetime.now(UTC)
    bought = PurchaseRequested(
        purchase_id=uuid4(),
        event_id=UUID(event_id),
        customer_id="payer",
        quantity=quantity,
        accepted_at=now,
    )
    paid = ConfirmRequested(
        purchase_id=bought.purchase_id,
        event_id=bought.event_id,
        payment_reference="psp-paid",
        accepted_at=paid_at or now,
    )
    return bought, paid


async def confirm(api: httpx.AsyncClient, purchase_id: UUID) -> None:
    response = await api.post(
        f"/purchases/{purchase_id}/confirm", json={"payment_reference": "psp-paid"}
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("settings", [{"delivery_limit": 1}], indirect=True)
async def test_a_confirmation_dead_lettered_past_its_delivery_limit_keeps_its_hold_until_replayed(
    settings: Settings,
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
) -> None:
    """The buyer paid and was answered 202 well within the hold; then every consumer that took
    the confirmation died holding it (none of them a worker), and the broker dead-lettered it.
    The recorder keeps the hold: past its end, with the queue drained (the unpaid hold bought
    just after it expires), it stays held and its ticket off sale, until the replayed
    confirmation confirms it."""
    topology = broker.Topology.from_settings(settings)
    worker = await start_worker()
    event_id = await held_event(api, db, tickets=2)
    paid = await buy_held(api, db, event_id, "payer")
    unpaid = await buy_held(api, db, event_id, "abandoner")  # its hold ends after paid's
    worker.stop()
    await wait_for_no_consumers(amqp, settings)

    await confirm(api, paid["id"])
    queue = topology.queue(topology.partition_of(UUID(event_id)))
    for _ in range(2):  # delivered, returned; delivered again, returned past the limit
        assert await take_and_die(settings, queue)
    await wait_queue_depth(settings, topology.dead_letter_queue, 1)

    await start_worker()
    # Proof that the partition's holds were swept past both ends: the unpaid one expired.
    await wait_for(
        lambda: has_status(db, unpaid["id"], "expired"), timeout_s=60, what="the unpaid hold"
    )
    row = await purchase_row(db, paid["id"])
    assert row["status"] == "held"
    assert row["hold_kept_since"] is not None
    assert await available(db, event_id) == 1  # the unpaid ticket back on sale, not the paid one
    out = io.StringIO()
    await admin.status(settings, out)
    assert "holds kept for a confirmation not applied yet: 1 " in out.getvalue()

    await admin.replay_dead_letters(settings, io.StringIO())
    await wait_for(
        lambda: has_status(db, paid["id"], "confirmed"),
        timeout_s=15,
        what="the replayed confirmation to be applied",
    )
    row = await purchase_row(db, paid["id"])
    assert row["payment_reference"] == "psp-paid"
    assert await available(db, event_id) == 1
    await assert_no_oversell(db)
    out = io.StringIO()
    await admin.status(settings, out)
    assert "holds kept" not in out.getvalue()


@pytest.mark.parametrize("settings", [{"delivery_limit": 5}], indirect=True)
async def test_a_confirmation_delivered_again_keeps_its_hold_before_it_is_applied(
    settings: Settings,
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
) -> None:
    """A worker that keeps failing on a confirmation returns it to the queue, delivery after
    delivery, until the broker dead-letters it. From its first redelivery, before it is applied,
    its hold is kept: a worker dying on it each time could not keep it later."""
    topology = broker.Topology.from_settings(settings)
    await start_worker()
    event_id = await held_event(api, db)
    held = await buy_held(api, db, event_id)
    purchase_id = held["id"]
    # Applying the confirmation fails, in a way a retry in place does not cure.
    await db.execute(
        """
        CREATE FUNCTION refuse_confirming() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
        CREATE TRIGGER refuse_confirming BEFORE UPDATE ON purchases FOR EACH ROW
            WHEN (OLD.status = 'held' AND NEW.status = 'confirmed')
            EXECUTE FUNCTION refuse_confirming();
        """
    )
    try:
        await confirm(api, purchase_id)

        await wait_for(lambda: is_kept(db, purchase_id), timeout_s=30, what="the hold to be kept")
        # Kept by the worker that has it in hand, not after the broker gave up on it.
        assert await broker.queue_depth(amqp, topology.dead_letter_queue) == 0
    finally:
        await db.execute(
            "DROP TRIGGER refuse_confirming ON purchases; DROP FUNCTION refuse_confirming()"
        )
    await wait_for(
        lambda: has_status(db, purchase_id, "confirmed"),
        timeout_s=30,
        what="the confirmation to be applied",
    )
    row = await purchase_row(db, purchase_id)
    assert row["payment_reference"] == "psp-paid"
    assert await broker.queue_depth(amqp, topology.dead_letter_queue) == 0
    await assert_no_oversell(db)


async def test_a_kept_hold_past_its_end_stays_held_and_stops_being_the_partitions_next_end(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """The owner's sweep waits for the partition's next hold end. A kept hold past its end must
    drop out of that reading once a sweep finds it: otherwise the sweep, always due, would run a
    transaction every few milliseconds for as long as the hold is kept."""
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    lease = await partition_lease(db)
    # Paid before the end the hold is given below.
    bought, paid = bought_and_paid(
        event["id"], quantity=2, paid_at=datetime.now(UTC) - timedelta(minutes=2)
    )
    first = await apply_batch(db, lease, [bought])
    assert first.holds_changed
    assert first.next_hold_end is not None
    async with db.acquire() as conn:
        (kept,) = await purchases.keep_holds(conn, [paid])
        assert (kept.status, kept.kept, kept.kept_now) == ("held", True, True)
        (again,) = await purchases.keep_holds(conn, [paid])
        assert (again.status, again.kept, again.kept_now) == ("held", True, False)
        # Its end long past, as if the dead letter had waited a while for its replay.
        await conn.execute(
            "UPDATE purchases SET hold_expires_at = now() - interval '1 minute' WHERE id = $1",
            bought.purchase_id,
        )

    async def drained() -> bool:
        return True

    swept = await apply_batch(db, lease, [], verify_drained=drained, holds_due=True)

    assert swept.transitions == []
    assert (await purchase_row(db, bought.purchase_id))["status"] == "held"
    assert swept.holds_changed
    assert swept.next_hold_end is None  # no hold of the partition may expire on the clock
    assert await available(db, event["id"]) == 8
    # Replayed, the confirmation confirms it; its hold is no longer reported kept.
    replayed = await apply_batch(db, lease, [paid], keep=[paid])
    assert (await purchase_row(db, bought.purchase_id))["status"] == "confirmed"
    assert [(h.status, h.kept) for h in replayed.kept] == [("confirmed", False)]


async def test_a_batch_keeps_the_hold_it_gives_to_a_purchase_whose_confirmation_came_first(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """A confirmation delivered again before its purchase had a row (the purchase in an earlier
    message of the same delivery) finds nothing to keep; the batch that records the purchase
    keeps its hold, in its own transaction."""
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    lease = await partition_lease(db)
    bought, paid = bought_and_paid(event["id"])
    async with db.acquire() as conn:
        (early,) = await purchases.keep_holds(conn, [paid])
    assert (early.status, early.kept) == (None, False)

    result = await apply_batch(db, lease, [bought], keep=[paid])

    assert [(h.status, h.kept, h.kept_now) for h in result.kept] == [("held", True, True)]
    assert await is_kept(db, bought.purchase_id)


@pytest.mark.parametrize("settings", [{"delivery_limit": 20, "batch_size": 1}], indirect=True)
async def test_a_confirmation_delivered_again_behind_a_failing_batch_keeps_its_hold_at_once(
    settings: Settings,
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
) -> None:
    """The worker fails on the message ahead of the confirmation, delivery after delivery, and
    the confirmation, delivered again each time with it, never reaches a batch of its own: the
    broker would dead-letter the two together. Its hold is kept as it arrives, not when a batch
    would have applied it."""
    topology = broker.Topology.from_settings(settings)
    worker = await start_worker()
    event_id = await held_event(api, db, tickets=2)
    held = await buy_held(api, db, event_id)
    worker.stop()
    await wait_for_no_consumers(amqp, settings)
    # Ahead of the confirmation: a purchase whose decision cannot be recorded.
    await db.execute(
        """
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON purchases FOR EACH ROW
            WHEN (NEW.customer_id = 'poison') EXECUTE FUNCTION refuse_poison();
        """
    )
    try:
        poison = await purchase(api, event_id, customer_id="poison")
        assert poison.status_code == 202, poison.text
        await confirm(api, held["id"])
        await start_worker()
        await wait_for(lambda: is_kept(db, held["id"]), timeout_s=15, what="the hold to be kept")
        assert await broker.queue_depth(amqp, topology.dead_letter_queue) == 0
    finally:
        await db.execute("DROP TRIGGER refuse_poison ON purchases; DROP FUNCTION refuse_poison()")
    await wait_for(
        lambda: has_status(db, held["id"], "confirmed"),
        timeout_s=30,
        what="the confirmation to be applied",
    )
    await assert_no_oversell(db)


async def test_a_confirmation_set_aside_with_its_purchase_keeps_the_hold_that_purchase_gets(
    settings: Settings,
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A purchase and its confirmation in one batch, the confirmation's message set aside
    (dead-lettered by the worker) for a record conflict of another purchase in it: the
    purchase is decided held only after the confirmation was set aside, in the commit of the
    rest of the batch, which keeps its hold (no dead-letter recorder runs here)."""

    async def blind(conn: object, purchase_ids: object) -> set[UUID]:
        return set()  # every retry "misses" the row written by another transaction

    async def no_recorder(self: DeadLetterRecorder, connection: object) -> None:
        return None  # the worker's own keep is what is tested: no recorder keeps it later

    monkeypatch.setattr("shared.purchases.repository.final_purchase_ids", blind)
    monkeypatch.setattr(DeadLetterRecorder, "start", no_recorder)
    topology = broker.Topology.from_settings(settings)
    event = await create_event_in_partition(api, settings, 0, total_tickets=3, hold_seconds=30)
    await db.execute("UPDATE events SET hold_seconds = $2 WHERE id = $1", UUID(event["id"]), HOLD_S)
    now = datetime.now(UTC)

    def bought(customer_id: str) -> PurchaseRequested:
        return PurchaseRequested(
            purchase_id=uuid4(),
            event_id=UUID(event["id"]),
            customer_id=customer_id,
            quantity=1,
            accepted_at=now,
        )

    paid, unpaid, conflicting = bought("payer"), bought("abandoner"), bought("someone")
    await db.execute(
        "INSERT INTO purchases (id, event_id, customer_id, quantity, status, reason) "
        "VALUES ($1, $2, 'someone', 1, 'rejected', 'sold_out')",
        conflicting.purchase_id,
        conflicting.event_id,
    )
    confirmation = ConfirmRequested(
        purchase_id=paid.purchase_id,
        event_id=paid.event_id,
        payment_reference="psp-paid",
        accepted_at=now,
    )
    # Queued before any worker runs, so the first batch holds both messages.
    await publish_raw(amqp, settings, 0, encode_message(0, [paid, unpaid]))
    await publish_raw(amqp, settings, 0, encode_message(0, [confirmation, conflicting]))
    await start_worker()

    await wait_queue_depth(settings, topology.dead_letter_queue, 1)
    await wait_for(
        lambda: has_status(db, unpaid.purchase_id, "expired"), timeout_s=60, what="the unpaid hold"
    )
    row = await purchase_row(db, paid.purchase_id)
    assert row["status"] == "held"
    assert row["hold_kept_since"] is not None
    assert await available(db, event["id"]) == 2

    monkeypatch.setattr("shared.purchases.repository.final_purchase_ids", final_purchase_ids)
    await admin.replay_dead_letters(settings, io.StringIO())  # the conflict fixed
    await wait_for(
        lambda: has_status(db, paid.purchase_id, "confirmed"),
        timeout_s=15,
        what="the replayed confirmation to be applied",
    )
    assert await available(db, event["id"]) == 2
    await assert_no_oversell(db)
