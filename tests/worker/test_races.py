"""Real races against real PostgreSQL and RabbitMQ: floods of concurrent purchases, several
workers, redelivered and duplicated messages, poison messages, and workers killed, paused,
stopped and added while purchases flow. Every test ends with the invariants checked in SQL."""

import asyncio
import json
import random
import signal
import time
from pathlib import Path
from uuid import UUID, uuid4

import aio_pika.abc
import asyncpg
import httpx
import pytest

from shared import broker_nodes
from shared.messages import PurchaseMessage, encode_message
from shared.settings import Settings
from tests.conftest import StartWorker
from tests.factories import assert_no_oversell, create_event, purchase, wait_until_final
from tests.worker.helpers import (
    Flood,
    WorkerProcess,
    assert_applied_once,
    assert_first_come_first_served,
    balanced,
    create_event_in_partition,
    flood,
    lease_rows,
    live_worker_ids,
    open_transactions_older_than,
    owners,
    partition_depths,
    partition_of,
    publish_raw,
    purchase_message,
    queue_depth,
    read_back,
    topology,
    wait_balanced,
    wait_for,
    wait_queue_depth,
    wait_started,
    worker_processes,
)
from worker import consumer, leases, membership
from worker.leases import Lease, assign
from worker.processor import RecordConflict, apply_batch
from worker.supervisor import Worker

# Subprocess workers: quiet (a line per purchase at INFO costs CPU), readable, no metrics port.
QUIET = {"LOG_LEVEL": "WARNING", "LOG_FORMAT": "text", "WORKER_METRICS_PORT": "0"}

FINAL_WITHIN_S = 60.0


async def event_row(db: asyncpg.Pool, event_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM events WHERE id = $1", UUID(event_id))
    assert row is not None
    return row


async def confirmed_tickets(db: asyncpg.Pool, event_id: str) -> int:
    total: int = await db.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM purchases "
        "WHERE event_id = $1 AND status = 'confirmed'",
        UUID(event_id),
    )
    return total


async def wait_stopped(db: asyncpg.Pool, worker_id: str) -> None:
    """An in-process worker asked to stop has left: its row is gone (it releases its leases and
    leaves last, after its consumers are closed)."""

    async def gone() -> bool:
        row = await db.fetchval("SELECT 1 FROM workers WHERE worker_id = $1", worker_id)
        return row is None

    await wait_for(gone, timeout_s=30, what=f"worker {worker_id} to leave")


# --- floods of concurrent purchases ------------------------------------------------------------


async def test_hundreds_of_concurrent_purchases_of_one_event_never_oversell(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    for _ in range(3):
        await start_worker()
    await wait_balanced(db, settings.partitions, ["worker-1", "worker-2", "worker-3"])
    event = await create_event(api, total_tickets=30)

    result = await flood(api, [event["id"]], 400, concurrency=400, max_quantity=3, seed=1)

    assert result.statuses()[202] >= 10, result.statuses()
    rows = await wait_until_final(db, result.accepted, timeout_s=FINAL_WITHIN_S)
    await assert_applied_once(db, result.accepted, result.quantities)
    await assert_no_oversell(db)
    assert await confirmed_tickets(db, event["id"]) == 30  # demand far above supply: sold out
    assert (await event_row(db, event["id"]))["available_tickets"] == 0
    statuses = {row["status"] for row in rows.values()}
    assert statuses <= {"confirmed", "rejected"}
    await assert_first_come_first_served(db)
    refreshed = await api.get(f"/events/{event['id']}")
    assert refreshed.json()["available_tickets"] == 0


async def test_concurrent_purchases_across_many_events_never_oversell(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    for _ in range(3):
        await start_worker()
    rnd = random.Random(5)
    events = [await create_event(api, total_tickets=rnd.randint(3, 40)) for _ in range(30)]
    await wait_balanced(db, settings.partitions, ["worker-1", "worker-2", "worker-3"])

    result = await flood(
        api, [e["id"] for e in events], 900, concurrency=300, max_quantity=4, seed=2
    )

    await wait_until_final(db, result.accepted, timeout_s=FINAL_WITHIN_S)
    await assert_applied_once(db, result.accepted, result.quantities)
    await assert_no_oversell(db)
    await assert_first_come_first_served(db)
    # Demand was well above supply: every event ends with fewer tickets than one purchase asks.
    for event in events:
        assert (await event_row(db, event["id"]))["available_tickets"] < 4


# --- first come, first served ------------------------------------------------------------------


async def test_purchases_answered_one_after_another_are_confirmed_in_that_order(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=5)
    answered: list[UUID] = []
    for n in range(10):
        response = await purchase(api, event["id"], customer_id=f"customer-{n}")
        assert response.status_code == 202, response.text
        answered.append(UUID(response.json()["purchase_id"]))

    await start_worker()
    rows = await wait_until_final(db, answered, timeout_s=FINAL_WITHIN_S)

    assert [rows[p]["status"] for p in answered] == ["confirmed"] * 5 + ["rejected"] * 5
    assert {rows[p]["reason"] for p in answered[5:]} == {"sold_out"}
    # The order the worker saw is the order the API answered in.
    assert sorted(answered, key=lambda p: rows[p]["accepted_at"]) == answered
    processed = [rows[p]["processed_at"] for p in answered]
    assert processed == sorted(processed)
    await assert_no_oversell(db)


async def test_sequential_purchases_follow_first_come_first_served_while_workers_run(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    """With workers consuming as purchases arrive (many small batches), mixed quantities are
    decided exactly as the decision rules say in answer order: a later, smaller purchase may get
    what an earlier, larger one could not, never the other way round."""
    await start_worker()
    await start_worker()
    await wait_balanced(db, settings.partitions, ["worker-1", "worker-2"])
    event = await create_event(api, total_tickets=40)
    rnd = random.Random(11)
    answered: list[tuple[UUID, int]] = []
    for n in range(70):
        quantity = rnd.randint(1, 4)
        response = await purchase(api, event["id"], quantity=quantity, customer_id=f"c-{n}")
        assert response.status_code in (202, 409), response.text
        if response.status_code == 202:
            answered.append((UUID(response.json()["purchase_id"]), quantity))

    rows = await wait_until_final(db, [p for p, _ in answered], timeout_s=FINAL_WITHIN_S)
    left = 40
    for purchase_id, quantity in answered:
        expected: tuple[str, str | None]
        if quantity <= left:
            expected = ("confirmed", None)
            left -= quantity
        else:
            expected = ("rejected", "sold_out" if left == 0 else "insufficient_tickets")
        assert (rows[purchase_id]["status"], rows[purchase_id]["reason"]) == expected
    assert left == 0
    assert (await event_row(db, event["id"]))["available_tickets"] == 0
    await assert_no_oversell(db)


async def test_event_edits_racing_the_workers_never_break_the_ticket_count(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    """PATCH /events takes the same row lock as the worker's commit: totals raised while a flood
    is being decided keep confirmed + available = total at every commit."""
    await start_worker()
    await start_worker()
    event = await create_event(api, total_tickets=50)

    async def raise_total() -> int:
        edits = 0
        for _ in range(20):
            current = (await api.get(f"/events/{event['id']}")).json()
            response = await api.patch(
                f"/events/{event['id']}", json={"total_tickets": current["total_tickets"] + 5}
            )
            assert response.status_code == 200, response.text
            edits += 1
            await assert_no_oversell(db)
        return edits

    result, edits = await asyncio.gather(
        flood(api, [event["id"]], 400, concurrency=40, max_quantity=2, seed=8), raise_total()
    )

    await wait_until_final(db, result.accepted, timeout_s=FINAL_WITHIN_S)
    await assert_applied_once(db, result.accepted, result.quantities)
    await assert_no_oversell(db)
    row = await event_row(db, event["id"])
    assert row["total_tickets"] == 50 + 5 * edits
    assert row["available_tickets"] >= 0


async def test_a_purchase_of_an_event_deleted_meanwhile_is_rejected_as_event_not_found(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=5)
    accepted = await purchase(api, event["id"], quantity=2)
    assert accepted.status_code == 202
    assert (await api.delete(f"/events/{event['id']}")).status_code == 204

    await start_worker()
    rows = await wait_until_final(db, [accepted.json()["purchase_id"]], timeout_s=FINAL_WITHIN_S)
    (row,) = rows.values()
    assert (row["status"], row["reason"]) == ("rejected", "event_not_found")
    assert await db.fetchval("SELECT count(*) FROM events") == 0


# --- duplicates --------------------------------------------------------------------------------


@pytest.mark.parametrize("timing", ["queued together", "one after the other"])
async def test_a_message_delivered_twice_is_applied_once(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
    timing: str,
) -> None:
    event = await create_event(api, total_tickets=10)
    partition = partition_of(settings, event["id"])
    message = purchase_message(partition, event["id"], quantity=3)
    purchase_id = message.purchases[0].purchase_id
    body = encode_message(message.partition, message.commands)

    if timing == "queued together":
        await publish_raw(amqp, settings, partition, body)
        await publish_raw(amqp, settings, partition, body)
        await start_worker()
        await wait_until_final(db, [purchase_id], timeout_s=FINAL_WITHIN_S)
    else:
        await start_worker()
        await publish_raw(amqp, settings, partition, body)
        await wait_until_final(db, [purchase_id], timeout_s=FINAL_WITHIN_S)
        await publish_raw(amqp, settings, partition, body)
    # A marker behind the duplicate: once it is decided, so is everything before it.
    marker = purchase_message(partition, event["id"], quantity=1)
    await publish_raw(amqp, settings, partition, encode_message(marker.partition, marker.commands))
    await wait_until_final(db, [marker.purchases[0].purchase_id], timeout_s=FINAL_WITHIN_S)

    rows = await db.fetch("SELECT id, status FROM purchases WHERE event_id = $1", UUID(event["id"]))
    assert sorted((r["id"], r["status"]) for r in rows) == sorted(
        [(purchase_id, "confirmed"), (marker.purchases[0].purchase_id, "confirmed")]
    )
    row = await event_row(db, event["id"])
    assert row["available_tickets"] == 10 - 3 - 1
    await assert_no_oversell(db)
    await wait_queue_depth(settings, topology(settings).queue(partition), 0)


async def test_a_standby_consumer_shows_no_progress_past_what_its_predecessor_holds(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    """A new owner's consumer is the broker's standby while a predecessor still holds the
    partition's messages (a frozen worker, until the broker closes its connection). Idle, it
    must not record that everything accepted until a moment ago is decided: a keyed purchase
    refused elsewhere would trust that and answer "nothing queued" for the purchase held."""
    event = await create_event(api, total_tickets=10)
    partition = partition_of(settings, event["id"])
    before = await db.fetchval("SELECT now()")
    held = await purchase(api, event["id"])
    assert held.status_code == 202
    predecessor = await broker_nodes.connect(settings)
    try:
        channel = await predecessor.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(topology(settings).queue(partition))
        got: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def hold(_: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not got.done():
                got.set_result(None)

        await queue.consume(hold)  # never acked
        await asyncio.wait_for(got, 10)
        worker = await start_worker()

        async def owned() -> bool:
            return (await owners(db)).get(partition) == worker.worker_id

        await wait_for(owned, timeout_s=30, what="the worker to lease the partition")
        # Idle for longer than an active consumer takes to record its progress (each second).
        await asyncio.sleep(3 * consumer.IDLE_PROGRESS_S)
        horizon = await db.fetchval(
            "SELECT horizon FROM partition_progress WHERE partition = $1", partition
        )
        assert horizon is None or horizon < before, "progress shown past a purchase still held"
    finally:
        await predecessor.close()  # gone: the purchase goes back to the queue, to the worker

    rows = await wait_until_final(db, [held.json()["purchase_id"]], timeout_s=FINAL_WITHIN_S)
    assert [row["status"] for row in rows.values()] == ["confirmed"]


async def test_a_purchase_retried_concurrently_with_one_idempotency_key_is_applied_once(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    await start_worker()
    event = await create_event(api, total_tickets=10)

    responses = await asyncio.gather(
        *(
            purchase(api, event["id"], quantity=2, customer_id="alice", idempotency_key="k-1")
            for _ in range(10)
        )
    )
    assert [r.status_code for r in responses] == [202] * 10
    ids = {r.json()["purchase_id"] for r in responses}
    assert len(ids) == 1
    purchase_id = UUID(ids.pop())
    await wait_until_final(db, [purchase_id], timeout_s=FINAL_WITHIN_S)

    # A retry once it is decided answers the same purchase and publishes nothing new.
    again = await purchase(api, event["id"], quantity=2, customer_id="alice", idempotency_key="k-1")
    assert again.status_code == 202
    assert UUID(again.json()["purchase_id"]) == purchase_id
    marker = await purchase(api, event["id"], quantity=1, customer_id="bob")
    await wait_until_final(db, [marker.json()["purchase_id"]], timeout_s=FINAL_WITHIN_S)

    assert await db.fetchval("SELECT count(*) FROM purchases WHERE id = $1", purchase_id) == 1
    assert await confirmed_tickets(db, event["id"]) == 3
    assert (await event_row(db, event["id"]))["available_tickets"] == 7
    await assert_no_oversell(db)


# --- poison messages ---------------------------------------------------------------------------


async def test_a_poison_message_is_dead_lettered_and_the_purchases_behind_it_still_go_through(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
) -> None:
    await start_worker()
    await wait_balanced(db, settings.partitions, ["worker-1"])
    event = await create_event(api, total_tickets=10)
    partition = partition_of(settings, event["id"])
    tp = topology(settings)

    before = await purchase(api, event["id"], customer_id="before")
    unknown_version = uuid4()
    wrong_field = uuid4()
    wrong = purchase_message(partition, event["id"], purchase_id=wrong_field)
    poison = [
        b"\xff\xfe not json at all \x00",
        json.dumps(
            {
                "version": 99,
                "partition": partition,
                "purchases": [{"purchase_id": str(unknown_version), "event_id": event["id"]}],
            }
        ).encode(),
        # Version 1, but a quantity the API could never have sent.
        encode_message(partition, wrong.commands).replace(b'"quantity":1', b'"quantity":0'),
    ]
    for body in poison:
        await publish_raw(amqp, settings, partition, body)
    behind = [await purchase(api, event["id"], customer_id=f"behind-{n}") for n in range(3)]

    decided = await wait_until_final(
        db,
        [before.json()["purchase_id"], *(r.json()["purchase_id"] for r in behind)],
        timeout_s=FINAL_WITHIN_S,
    )
    assert {row["status"] for row in decided.values()} == {"confirmed"}

    failed = await wait_until_final(db, [unknown_version, wrong_field], timeout_s=FINAL_WITHIN_S)
    for row in failed.values():
        assert (row["status"], row["reason"]) == ("failed", "undecodable_message")

    await wait_queue_depth(settings, tp.dead_letter_queue, len(poison))
    kept = await read_back(settings, tp.dead_letter_queue)
    assert sorted(kept) == sorted(poison)
    await wait_queue_depth(settings, tp.dead_letter_record_queue, 0)
    assert await queue_depth(settings, tp.queue(partition)) == 0
    assert (await event_row(db, event["id"]))["available_tickets"] == 6
    await assert_no_oversell(db)


async def test_a_message_of_another_partition_is_dead_lettered_never_applied(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
) -> None:
    """What a publisher counting with another PARTITIONS would send: a message in queue p that
    says another partition, or names an event that routes elsewhere. Applying it would give the
    event a second writer; it is dead-lettered (kept for replay) and its purchases recorded
    failed with reason wrong_partition, while the queue goes on."""
    await start_worker()
    await wait_balanced(db, settings.partitions, ["worker-1"])
    here = await create_event_in_partition(api, settings, 0, total_tickets=10)
    elsewhere = await create_event_in_partition(api, settings, 1, total_tickets=10)
    tp = topology(settings)
    says_other = purchase_message(1, here["id"])
    routes_other = purchase_message(0, elsewhere["id"])
    for message in (says_other, routes_other):
        await publish_raw(amqp, settings, 0, encode_message(message.partition, message.commands))
    behind = await purchase(api, here["id"], customer_id="behind")

    decided = await wait_until_final(db, [behind.json()["purchase_id"]], timeout_s=FINAL_WITHIN_S)
    assert [row["status"] for row in decided.values()] == ["confirmed"]
    wrong = [says_other.purchases[0].purchase_id, routes_other.purchases[0].purchase_id]
    failed = await wait_until_final(db, wrong, timeout_s=FINAL_WITHIN_S)
    assert {(row["status"], row["reason"]) for row in failed.values()} == {
        ("failed", "wrong_partition")
    }
    await wait_queue_depth(settings, tp.dead_letter_queue, 2)
    assert (await event_row(db, here["id"]))["available_tickets"] == 9
    assert (await event_row(db, elsewhere["id"]))["available_tickets"] == 10
    await assert_no_oversell(db)


async def test_a_decision_whose_row_another_transaction_wrote_is_never_committed(
    db: asyncpg.Pool, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's duplicate check and its write are two statements: a row recorded in between
    (by anything) makes the upsert skip it. The batch must then roll back whole, or it would
    take tickets for a purchase it never recorded."""
    event = await create_event(api, total_tickets=10)
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        acquired = await leases.acquire(conn, 0, "w", 30)
    assert acquired is not None
    lease = Lease(0, "w", acquired.epoch)
    batch = [
        purchase_message(0, event["id"], quantity=2).purchases[0],
        purchase_message(0, event["id"], quantity=3).purchases[0],
    ]
    raced = batch[1].purchase_id
    await db.execute(
        "INSERT INTO purchases (id, event_id, customer_id, quantity, status, reason) "
        "VALUES ($1, $2, 'someone', 3, 'rejected', 'sold_out')",
        raced,
        UUID(event["id"]),
    )

    async def nothing_decided_yet(conn: object, purchase_ids: object) -> set[UUID]:
        return set()  # as if the row was written after the check

    monkeypatch.setattr("shared.purchases.repository.final_purchase_ids", nothing_decided_yet)
    with pytest.raises(RecordConflict):
        await apply_batch(db, lease, batch)

    assert (await event_row(db, event["id"]))["available_tickets"] == 10
    assert await db.fetchval("SELECT count(*) FROM purchases") == 1
    monkeypatch.undo()
    # The retry sees the row, skips that purchase as decided and applies the other.
    result = await apply_batch(db, lease, batch)
    assert (result.duplicates, len(result.decisions)) == (1, 1)
    assert (await event_row(db, event["id"]))["available_tickets"] == 8


async def test_a_batch_that_keeps_conflicting_is_dead_lettered_and_its_partition_goes_on(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A conflict that a retry does not cure (a bug) must not block the partition for ever, nor
    be committed: after a few attempts the message holding it is dead-lettered, its undecided
    purchases are recorded failed (record_conflict), what was decided stays as it was, and the
    other messages of the same batch are applied."""

    async def blind(conn: object, purchase_ids: object) -> set[UUID]:
        return set()  # every retry "misses" the row written by another transaction

    monkeypatch.setattr("shared.purchases.repository.final_purchase_ids", blind)
    event = await create_event_in_partition(api, settings, 0, total_tickets=10)
    conflicting = PurchaseMessage(
        partition=0,
        commands=[
            purchase_message(0, event["id"]).purchases[0],
            purchase_message(0, event["id"]).purchases[0],
        ],
    )
    decided_elsewhere, undecided = (p.purchase_id for p in conflicting.purchases)
    await db.execute(
        "INSERT INTO purchases (id, event_id, customer_id, quantity, status, reason) "
        "VALUES ($1, $2, 'someone', 1, 'rejected', 'sold_out')",
        decided_elsewhere,
        UUID(event["id"]),
    )
    neighbour = purchase_message(0, event["id"], quantity=2)
    # Queued before any worker runs, so the first batch holds both messages.
    await publish_raw(
        amqp, settings, 0, encode_message(conflicting.partition, conflicting.commands)
    )
    await publish_raw(amqp, settings, 0, encode_message(neighbour.partition, neighbour.commands))
    await start_worker()
    behind = await purchase(api, event["id"], customer_id="behind")

    rows = await wait_until_final(
        db,
        [undecided, neighbour.purchases[0].purchase_id, behind.json()["purchase_id"]],
        timeout_s=FINAL_WITHIN_S,
    )
    assert (rows[undecided]["status"], rows[undecided]["reason"]) == ("failed", "record_conflict")
    assert rows[neighbour.purchases[0].purchase_id]["status"] == "confirmed"
    assert rows[UUID(behind.json()["purchase_id"])]["status"] == "confirmed"
    kept = await db.fetchrow(
        "SELECT status, reason FROM purchases WHERE id = $1", decided_elsewhere
    )
    assert kept is not None
    assert (kept["status"], kept["reason"]) == ("rejected", "sold_out")
    await wait_queue_depth(settings, topology(settings).dead_letter_queue, 1)
    assert (await event_row(db, event["id"]))["available_tickets"] == 7


# --- workers dying, pausing, stopping, joining -------------------------------------------------


async def events_in_every_partition(
    api: httpx.AsyncClient, settings: Settings, per_partition: int, total_tickets: int
) -> list[dict[str, object]]:
    return [
        await create_event_in_partition(api, settings, p, total_tickets=total_tickets)
        for p in range(settings.partitions)
        for _ in range(per_partition)
    ]


async def decided_in(db: asyncpg.Pool, partitions: list[int]) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM purchases WHERE partition = ANY($1::int[])", partitions
    )
    return count


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"partitions": 6}], indirect=True)
async def test_a_worker_killed_mid_flood_loses_nothing_and_its_partitions_move(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, tmp_path: Path
) -> None:
    events = await events_in_every_partition(api, settings, 2, total_tickets=150)
    names = ["w-a", "w-b", "w-c"]
    async with worker_processes(settings, tmp_path) as spawn:
        workers = {name: await spawn(name, **QUIET) for name in names}
        await wait_started(db, list(workers.values()))
        await wait_balanced(db, 6, names, timeout_s=30)
        victim, survivors = workers["w-a"], [workers["w-b"], workers["w-c"]]
        held = {r["partition"]: r["epoch"] for r in await lease_rows(db) if r["owner"] == "w-a"}
        assert len(held) == 2

        result = Flood()
        flooding = asyncio.create_task(
            flood(
                api,
                [str(e["id"]) for e in events],
                1200,
                concurrency=30,
                max_quantity=3,
                seed=3,
                into=result,
            )
        )

        async def victim_busy() -> bool:
            return len(result.answered) >= 250 and await decided_in(db, list(held)) > 0

        await wait_for(victim_busy, timeout_s=60, what="the victim to be consuming the flood")
        assert not flooding.done(), "the flood ended before the kill: nothing was in flight"
        victim.send(signal.SIGKILL)
        killed_at = time.monotonic()
        assert await victim.wait(10) == -signal.SIGKILL
        await asyncio.wait_for(flooding, 120)

        async def taken_over() -> bool:
            rows = {r["partition"]: r for r in await lease_rows(db)}
            return await balanced(db, 6, ["w-b", "w-c"]) and all(
                rows[p]["epoch"] > epoch for p, epoch in held.items()
            )

        await wait_for(taken_over, timeout_s=30, what="the dead worker's leases to move")
        moved_after = time.monotonic() - killed_at
        await wait_until_final(db, result.accepted, timeout_s=FINAL_WITHIN_S)
        assert all(w.running for w in survivors)

    print(f"victim's partitions moved within {moved_after:.1f} s of the kill; {result.statuses()}")
    await assert_applied_once(db, result.accepted, result.quantities)
    await assert_no_oversell(db)
    await assert_first_come_first_served(db)


async def undecided(db: asyncpg.Pool, purchase_ids: list[UUID]) -> int:
    decided: int = await db.fetchval(
        "SELECT count(*) FROM purchases WHERE id = ANY($1::uuid[])", purchase_ids
    )
    return len(purchase_ids) - decided


async def pause_outside_a_transaction(worker: WorkerProcess, db: asyncpg.Pool) -> None:
    """SIGSTOP the worker, retrying if it froze inside a database transaction (that would hold its
    fence's row lock and block the takeover, which is not what this test is about)."""
    for _ in range(10):
        worker.send(signal.SIGSTOP)
        await asyncio.sleep(0.8)  # let any transaction of the others finish
        if await open_transactions_older_than(db, 0.6) == 0:
            return
        worker.send(signal.SIGCONT)
        await asyncio.sleep(0.2)
    raise AssertionError("could not pause the worker outside a transaction")


@pytest.mark.slow
async def test_a_worker_paused_past_its_lease_cannot_commit_after_another_took_over(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, tmp_path: Path
) -> None:
    """The paused worker is frozen holding delivered, undecided purchases (its batches wait 1.5 s
    to fill); the other worker takes its leases once they expire; resumed, the paused worker
    gives them up (not extended for too long) or its commit fails the fence, and its purchases
    are applied once, by the new owner."""
    names = ["w-paused", "w-other"]
    async with worker_processes(settings, tmp_path) as spawn:
        paused = await spawn("w-paused", BATCH_MAX_WAIT_MS=1500, **QUIET)
        other = await spawn("w-other", **QUIET)
        await wait_started(db, [paused, other])
        await wait_balanced(db, settings.partitions, names, timeout_s=30)
        held = {
            r["partition"]: r["epoch"] for r in await lease_rows(db) if r["owner"] == "w-paused"
        }
        assert held
        events = await events_in_every_partition(api, settings, 1, total_tickets=60)
        theirs = [str(e["id"]) for e in events if partition_of(settings, str(e["id"])) in held]

        result = Flood()
        for attempt in range(5):
            await flood(api, theirs, 100, concurrency=20, max_quantity=2, seed=attempt, into=result)
            await pause_outside_a_transaction(paused, db)
            if await undecided(db, result.accepted):
                break  # frozen with purchases in hand
            paused.send(signal.SIGCONT)
        else:
            raise AssertionError("the paused worker never held undecided purchases")

        async def taken_over() -> bool:
            rows = {r["partition"]: r for r in await lease_rows(db)}
            return all(
                rows[p]["owner"] == "w-other" and rows[p]["live"] and rows[p]["epoch"] > epoch
                for p, epoch in held.items()
            )

        await wait_for(taken_over, timeout_s=30, what="the paused worker's leases to move")
        paused.send(signal.SIGCONT)
        # More purchases while the resumed worker finds out it lost its leases.
        await flood(api, theirs, 60, concurrency=10, max_quantity=2, seed=9, into=result)
        await wait_until_final(db, result.accepted, timeout_s=FINAL_WITHIN_S)
        await wait_balanced(db, settings.partitions, names, timeout_s=30)
        log = paused.log()

    await assert_applied_once(db, result.accepted, result.quantities)
    await assert_no_oversell(db)
    await assert_first_come_first_served(db)
    assert "lease lost" in log or "lease taken over" in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"partitions": 6}], indirect=True)
async def test_partitions_rebalance_as_workers_go_from_one_to_three_to_two(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    events = await events_in_every_partition(api, settings, 1, total_tickets=1000)
    event_ids = [str(e["id"]) for e in events]
    trickle: list[UUID] = []
    stop_trickle = asyncio.Event()

    async def keep_buying() -> None:
        n = 0
        while not stop_trickle.is_set():
            response = await purchase(api, event_ids[n % 6], customer_id=f"t-{n}")
            assert response.status_code == 202, response.text
            trickle.append(UUID(response.json()["purchase_id"]))
            n += 1
            await asyncio.sleep(0.02)

    async def flowing_in_every_partition() -> None:
        ids = [
            UUID((await purchase(api, e, customer_id="probe")).json()["purchase_id"])
            for e in event_ids
        ]
        await wait_until_final(db, ids, timeout_s=15)

    async def worker_view_matches(workers: list[str]) -> bool:
        """The lease table and each worker's own view agree."""
        current = await owners(db)
        return all(
            sorted(p for p, o in current.items() if o == w.worker_id) == w.partitions
            for w in running
            if w.worker_id in workers
        )

    running: list[Worker] = []
    buying = asyncio.create_task(keep_buying())
    try:
        running.append(await start_worker("w-1"))
        took = await wait_balanced(db, 6, ["w-1"], timeout_s=15)
        await wait_for(lambda: worker_view_matches(["w-1"]), timeout_s=5, what="w-1's own view")
        await flowing_in_every_partition()
        assert (await owners(db)) == dict.fromkeys(range(6), "w-1")

        running += [await start_worker("w-2"), await start_worker("w-3")]
        took_3 = await wait_balanced(db, 6, ["w-1", "w-2", "w-3"], timeout_s=15)
        await wait_for(
            lambda: worker_view_matches(["w-1", "w-2", "w-3"]), timeout_s=5, what="own views"
        )
        await flowing_in_every_partition()

        running[2].stop()
        took_2 = await wait_balanced(db, 6, ["w-1", "w-2"], timeout_s=15)
        await wait_stopped(db, "w-3")
        await wait_for(lambda: worker_view_matches(["w-1", "w-2"]), timeout_s=5, what="views")
        await flowing_in_every_partition()
        final_owners = list((await owners(db)).values())
        assert [final_owners.count(w) for w in ("w-1", "w-2")] == [3, 3]
    finally:
        stop_trickle.set()
        await buying

    print(f"balanced after {took:.1f} s (1), {took_3:.1f} s (3), {took_2:.1f} s (2)")
    await wait_until_final(db, trickle, timeout_s=FINAL_WITHIN_S)
    await assert_applied_once(db, [*trickle, *await probe_ids(db)])
    await assert_no_oversell(db)
    await assert_first_come_first_served(db)


async def probe_ids(db: asyncpg.Pool) -> list[UUID]:
    return [r["id"] for r in await db.fetch("SELECT id FROM purchases WHERE customer_id = 'probe'")]


@pytest.mark.slow
async def test_graceful_shutdown_mid_flood_loses_nothing_and_leaves_no_batch_unacked(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    settings: Settings,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    """SIGTERM the only worker mid-flood: it exits 0 within seconds, having released its leases.
    What it decided is acked (no decided purchase is left in a queue); what it did not decide is
    still queued (nothing lost). Another worker then finishes, and the queues end empty."""
    events = await events_in_every_partition(api, settings, 2, total_tickets=200)
    tp = topology(settings)
    async with worker_processes(settings, tmp_path) as spawn:
        worker = await spawn("w-term", **QUIET)
        await wait_started(db, [worker])
        await wait_balanced(db, settings.partitions, ["w-term"], timeout_s=30)
        result = Flood()
        flooding = asyncio.create_task(
            flood(
                api,
                [str(e["id"]) for e in events],
                1000,
                concurrency=30,
                max_quantity=2,
                seed=6,
                into=result,
            )
        )

        async def busy() -> bool:
            return len(result.answered) >= 250 and await decided_in(db, list(range(4))) > 0

        await wait_for(busy, timeout_s=60, what="the worker to be consuming the flood")
        assert not flooding.done(), "the flood ended before the SIGTERM"
        worker.send(signal.SIGTERM)
        started = time.monotonic()
        assert await worker.wait(15) == 0, worker.log()[-3000:]
        exited_after = time.monotonic() - started
        await asyncio.wait_for(flooding, 120)

    assert [(r["owner"], r["expires_at"]) for r in await lease_rows(db)] == [(None, None)] * 4
    assert await db.fetchval("SELECT count(*) FROM workers") == 0

    decided = {r["id"] for r in await db.fetch("SELECT id FROM purchases")}
    queued: list[UUID] = []
    for p in range(tp.partitions):
        for body in await read_back(settings, tp.queue(p)):
            queued += [x.purchase_id for x in PurchaseMessage.from_body(body).purchases]
    assert decided, "the worker decided nothing before its SIGTERM"
    assert not decided & set(queued), (
        f"{len(decided & set(queued))} decided purchases still queued: a batch was left unacked"
    )
    assert set(result.accepted) == decided | set(queued), "accepted purchases were lost"
    assert len(queued) == len(set(queued))
    assert await queue_depth(settings, tp.dead_letter_queue) == 0

    finisher = await start_worker("w-finish")
    await wait_until_final(db, result.accepted, timeout_s=FINAL_WITHIN_S)
    await assert_applied_once(db, result.accepted, result.quantities)
    await assert_no_oversell(db)
    await assert_first_come_first_served(db)

    async def queues_empty() -> bool:
        return set((await partition_depths(settings)).values()) == {0}

    await wait_for(queues_empty, timeout_s=15, what="the partition queues to be empty")
    finisher.stop()
    await wait_stopped(db, "w-finish")
    # Its channels are closed now: anything it had left unacked would be ready again.
    assert set((await partition_depths(settings)).values()) == {0}
    print(f"SIGTERM to exit: {exited_after:.2f} s; {result.statuses()}")


@pytest.mark.slow
async def test_a_worker_frozen_inside_a_commit_blocks_no_partition_but_that_one(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    """A worker that froze (SIGSTOP, VM pause, network cut) between its fence check and its
    COMMIT keeps a row lock on its lease. Its other partitions, and everyone else's, must keep
    being decided; at worst the one partition it was committing waits for it."""
    names = ["frozen", "w-1", "w-2"]
    plan = assign(settings.partitions, names)
    its_partitions = sorted(p for p, owner in plan.items() if owner == "frozen")
    committing = its_partitions[0]
    events = {
        p: await create_event_in_partition(api, settings, p, total_tickets=100)
        for p in range(settings.partitions)
    }
    # "frozen" is live and holds its share, like any worker, until it freezes mid-commit.
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, settings.partitions)
        await membership.join(conn, "frozen", uuid4(), 5, wait_s=0)
        epochs = {p: await leases.acquire(conn, p, "frozen", 5) for p in its_partitions}
    await start_worker("w-1")
    await start_worker("w-2")

    async def others_settled() -> bool:
        current = await owners(db)
        return all(current[p] == owner for p, owner in plan.items() if owner != "frozen")

    await wait_for(others_settled, timeout_s=4, what="w-1 and w-2 to take their share")

    frozen = await db.acquire()
    transaction = frozen.transaction()
    await transaction.start()
    acquired = epochs[committing]
    assert acquired is not None
    await leases.check_fence(frozen, committing, "frozen", acquired.epoch)
    try:
        probes = {
            UUID(
                (await purchase(api, str(events[p]["id"]), customer_id="c")).json()["purchase_id"]
            ): p
            for p in range(settings.partitions)
            if p != committing
        }

        async def all_decided() -> bool:
            rows = await db.fetch("SELECT id FROM purchases WHERE id = ANY($1::uuid[])", [*probes])
            return len(rows) == len(probes)

        try:
            await wait_for(all_decided, timeout_s=15, what="every other partition to be decided")
        except AssertionError:
            rows = await db.fetch("SELECT id FROM purchases WHERE id = ANY($1::uuid[])", [*probes])
            stalled = sorted(p for i, p in probes.items() if i not in {r["id"] for r in rows})
            raise AssertionError(
                f"partitions {stalled} stalled behind the frozen commit on partition "
                f"{committing}; live workers {sorted(await live_worker_ids(db))}; "
                f"leases {[(r['partition'], r['owner'], r['live']) for r in await lease_rows(db)]}"
            ) from None
        assert await live_worker_ids(db) == {"w-1", "w-2"}
    finally:
        await transaction.rollback()
        await db.release(frozen)


@pytest.mark.slow
async def test_a_commit_held_open_past_half_a_lease_costs_its_worker_no_lease(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    """One slow commit (here it waits on an event row someone else has locked) holds its lease
    row and a pool connection for two lease lifetimes. The worker's heartbeat and renewals must
    not wait behind it: every lease stays live at the same epoch, and the other partitions keep
    committing on the connections left."""
    await start_worker("slow-committer", db_pool_max=2)
    await wait_balanced(db, settings.partitions, ["slow-committer"])
    epochs = {row["partition"]: row["epoch"] for row in await lease_rows(db)}
    events = {
        p: await create_event_in_partition(api, settings, p, total_tickets=100)
        for p in range(settings.partitions)
    }
    slow = 0

    async def commit_waits_on_the_lock() -> bool:
        waiting: int = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return waiting > 0

    async with db.acquire() as blocker, blocker.transaction():
        await blocker.execute(
            "SELECT 1 FROM events WHERE id = $1 FOR UPDATE", UUID(events[slow]["id"])
        )
        stuck = await purchase(api, events[slow]["id"])
        assert stuck.status_code == 202
        await wait_for(commit_waits_on_the_lock, timeout_s=10, what="the commit to block")
        held_until = time.monotonic() + 2 * settings.lease_ttl_s
        while time.monotonic() < held_until:
            rows = await lease_rows(db)
            assert all(row["live"] for row in rows), [dict(row) for row in rows]
            assert {row["partition"]: (row["owner"], row["epoch"]) for row in rows} == {
                p: ("slow-committer", epoch) for p, epoch in epochs.items()
            }
            await asyncio.sleep(0.2)
        others = [
            (await purchase(api, events[p]["id"], customer_id="other")).json()["purchase_id"]
            for p in events
            if p != slow
        ]
        await wait_until_final(db, others, timeout_s=15)
        assert await commit_waits_on_the_lock(), "the slow commit ended early: nothing was held"
    decided = await wait_until_final(db, [stuck.json()["purchase_id"]], timeout_s=15)
    assert [row["status"] for row in decided.values()] == ["confirmed"]
    assert {row["partition"]: row["epoch"] for row in await lease_rows(db)} == epochs
