"""Operator commands: `python -m worker status` and `python -m worker replay-dead-letters`."""

import asyncio
import base64
import io
import subprocess
import sys
from datetime import UTC, datetime
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import httpx
import pytest

from shared import broker
from shared.messages import (
    CancelRequested,
    ConfirmRequested,
    PurchaseMessage,
    PurchaseRequested,
    encode_message,
)
from shared.purchases.models import FailReason
from shared.purchases.repository import record_failed_purchases
from shared.settings import Settings
from tests.conftest import StartWorker, settings_env
from tests.factories import assert_no_oversell, create_event, purchase, wait_until_final
from tests.worker.helpers import publish_raw, take_and_die
from worker import admin, leases
from worker.leases import Lease
from worker.processor import apply_batch


async def wait_for_owners(db: asyncpg.Pool, partitions: int) -> None:
    for _ in range(100):
        owned = await db.fetchval(
            "SELECT count(*) FROM partition_leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
        if owned == partitions:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker never took every partition")


async def test_status_says_so_when_no_management_api_tells_the_queue_leaders(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel
) -> None:
    # The leaders themselves are shown on a real cluster: tests/faults/test_broker_cluster.py.
    closed = settings.model_copy(update={"rabbitmq_management_url": "http://127.0.0.1:9/"})
    out = io.StringIO()
    await admin.status(closed, out)
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if line.split()[0] == "partition")
    assert header.split()[-1] == "leader"
    rows = [line.split() for line in lines if line.split()[0].isdigit()]
    assert len(rows) == settings.partitions
    assert all(row[-1] == "-" for row in rows)
    assert any(
        line.startswith("partition leaders: unknown") and "127.0.0.1:9" in line for line in lines
    )


async def test_status_prints_each_partitions_owner_epoch_depth_and_the_dead_letters(
    settings: Settings,
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
) -> None:
    event = await create_event(api)
    for _ in range(3):  # no worker yet: they wait in the event's partition
        assert (await purchase(api, event["id"])).status_code == 202
    topology = broker.Topology.from_settings(settings)
    partition = topology.partition_of(UUID(event["id"]))
    async with db.acquire() as conn:
        await conn.execute(
            "INSERT INTO partition_leases (partition, owner, epoch, expires_at) "
            "VALUES ($1, 'ops-worker', 7, now() + interval '1 minute')",
            partition,
        )

    out = io.StringIO()
    await admin.status(settings, out)
    lines = out.getvalue().splitlines()

    rows = {int(line.split()[0]): line.split() for line in lines if line.split()[0].isdigit()}
    assert sorted(rows) == list(range(settings.partitions))
    assert rows[partition][1:5] == ["ops-worker", "7", "live", "3"]
    assert all(rows[p][1:5] == ["-", "0", "free", "0"] for p in rows if p != partition)
    assert "queued in all partitions: 3" in lines
    assert f"dead letters ({topology.dead_letter_queue}): 0" in lines


def test_status_command_runs_from_the_command_line(settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "status"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "partition" in result.stdout
    assert "dead letters" in result.stdout


async def test_replay_moves_dead_letters_back_and_their_purchases_get_decided(
    settings: Settings,
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
) -> None:
    topology = broker.Topology.from_settings(settings)
    event = await create_event(api, total_tickets=10)
    event_id = UUID(event["id"])
    purchase_id = UUID("0f0e0d0c-0b0a-4908-8706-050403020100")
    dead = PurchaseMessage(
        partition=topology.partition_of(event_id),
        commands=[
            PurchaseRequested(
                purchase_id=purchase_id,
                event_id=event_id,
                customer_id="dead-lettered",
                quantity=2,
                accepted_at=datetime.now(UTC),
            )
        ],
    )
    dlx = await amqp.get_exchange(topology.dead_letter_exchange)
    for body in (encode_message(dead.partition, dead.commands), b"\x00 not a purchase message"):
        await dlx.publish(aio_pika.Message(body, delivery_mode=2), routing_key="")

    await start_worker()
    # The worker's recorder marks the dead-lettered purchase failed; a client polling it sees so.
    failed = await wait_until_final(db, [purchase_id])
    assert failed[purchase_id]["status"] == "failed"
    assert failed[purchase_id]["reason"] == "dead_lettered"

    out = io.StringIO()
    replayed, kept = await admin.replay_dead_letters(settings, out)
    assert (replayed, kept) == (1, 1)
    assert "replayed 1 purchase(s); 1 undecodable" in out.getvalue()

    for _ in range(100):
        row = await db.fetchrow("SELECT status, quantity FROM purchases WHERE id = $1", purchase_id)
        if row is not None and row["status"] == "confirmed":
            break
        await asyncio.sleep(0.1)
    assert row is not None
    assert (row["status"], row["quantity"]) == ("confirmed", 2)
    available = await db.fetchval("SELECT available_tickets FROM events WHERE id = $1", event_id)
    assert available == 8
    depth = await broker.queue_depth(amqp, topology.dead_letter_queue)
    assert depth == 1  # the undecodable one stays for inspection


@pytest.mark.parametrize("follower", ["confirm", "cancel"])
async def test_a_replayed_failed_purchase_is_decided_even_with_what_names_it_in_its_batch(
    api: httpx.AsyncClient, db: asyncpg.Pool, follower: str
) -> None:
    """A purchase and its confirmation (or cancellation), both dead-lettered, then replayed
    into one batch: the purchase is decided and the command behind it applied, rather than the
    failed row taken for a decision and the purchase skipped as its repeat."""
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    event_id = UUID(event["id"])
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        acquired = await leases.acquire(conn, 0, "replayer", 30)
    assert acquired is not None
    bought = PurchaseRequested(
        purchase_id=uuid4(),
        event_id=event_id,
        customer_id="replayed",
        quantity=2,
        accepted_at=datetime.now(UTC),
    )
    async with db.acquire() as conn:
        await record_failed_purchases(
            conn, [bought], reason=FailReason.DELIVERY_LIMIT_EXCEEDED, partition=0
        )
    behind: ConfirmRequested | CancelRequested = (
        ConfirmRequested(
            purchase_id=bought.purchase_id,
            event_id=event_id,
            payment_reference="psp-9",
            accepted_at=datetime.now(UTC),
        )
        if follower == "confirm"
        else CancelRequested(
            purchase_id=bought.purchase_id, event_id=event_id, accepted_at=datetime.now(UTC)
        )
    )

    result = await apply_batch(db, Lease(0, "replayer", acquired.epoch), [bought, behind])

    assert result.duplicates == 0
    status = await db.fetchval("SELECT status FROM purchases WHERE id = $1", bought.purchase_id)
    available = await db.fetchval("SELECT available_tickets FROM events WHERE id = $1", event_id)
    if follower == "confirm":
        assert (status, available) == ("confirmed", 8)
    else:
        assert (status, available) == ("cancelled", 10)
    await assert_no_oversell(db)


@pytest.mark.parametrize("settings", [{"delivery_limit": 1}], indirect=True)
async def test_a_message_past_its_delivery_limit_is_dead_lettered_and_recorded_failed(
    settings: Settings,
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    start_worker: StartWorker,
) -> None:
    """A message that keeps coming back (its consumers die holding it) is dead-lettered by the
    broker after DELIVERY_LIMIT deliveries, and its purchase is answered `failed`."""
    topology = broker.Topology.from_settings(settings)
    event = await create_event(api)
    accepted = await purchase(api, event["id"])
    purchase_id = accepted.json()["purchase_id"]
    queue_name = topology.queue(topology.partition_of(UUID(event["id"])))

    # Two consumers in turn take the message and die without acking (channel closed).
    for _ in range(2):
        if not await take_and_die(settings, queue_name):
            break  # already dead-lettered

    await start_worker()
    rows = await wait_until_final(db, [purchase_id])
    row = rows[UUID(purchase_id)]
    assert (row["status"], row["reason"]) == ("failed", "delivery_limit_exceeded")
    status = (await api.get(f"/purchases/{purchase_id}")).json()
    assert (status["status"], status["reason"]) == ("failed", "delivery_limit_exceeded")
    assert await broker.queue_depth(amqp, topology.dead_letter_queue) == 1


async def dead_letter_depth_reaches(
    amqp: aio_pika.abc.AbstractChannel, topology: broker.Topology, depth: int
) -> None:
    """A quorum queue counts messages put back (nacked) a moment after: read until it does."""
    seen = -1
    for _ in range(50):
        seen = await broker.queue_depth(amqp, topology.dead_letter_queue)
        if seen == depth:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{seen} dead letters, not {depth}")


async def test_dead_letters_are_listed_with_why_and_what_and_all_kept(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel, start_worker: StartWorker
) -> None:
    topology = broker.Topology.from_settings(settings)
    purchase_id = uuid4()
    readable = PurchaseMessage(
        partition=0,
        commands=[
            PurchaseRequested(
                purchase_id=purchase_id,
                event_id=uuid4(),
                customer_id="dead-lettered",
                quantity=1,
                accepted_at=datetime.now(UTC),
            )
        ],
    )
    dlx = await amqp.get_exchange(topology.dead_letter_exchange)
    await dlx.publish(
        aio_pika.Message(encode_message(0, readable.commands), delivery_mode=2), routing_key=""
    )
    # A message the worker cannot decode: RabbitMQ dead-letters it, saying why and from where.
    await publish_raw(amqp, settings, 1, b"\x00 not a purchase message")
    await start_worker()
    await dead_letter_depth_reaches(amqp, topology, 2)

    out = io.StringIO()
    listed = await admin.dead_letters(settings, out)

    assert listed == (2, 0)
    lines = out.getvalue().splitlines()
    assert any(str(purchase_id) in line and "1 PurchaseRequested" in line for line in lines)
    assert any(
        "undecodable, rejected from " + topology.queue(1) in line and "not a purchase" in line
        for line in lines
    ), lines
    assert lines[-1] == f"2 dead letter(s) in {topology.dead_letter_queue}"
    await dead_letter_depth_reaches(amqp, topology, 2)  # all kept


async def test_undecodable_dead_letters_are_dropped_printed_whole_and_only_they(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel
) -> None:
    topology = broker.Topology.from_settings(settings)
    readable = encode_message(
        0,
        [
            PurchaseRequested(
                purchase_id=uuid4(),
                event_id=uuid4(),
                customer_id="kept",
                quantity=1,
                accepted_at=datetime.now(UTC),
            )
        ],
    )
    garbage = b"\xff\xfe garbage that no worker can replay"
    dlx = await amqp.get_exchange(topology.dead_letter_exchange)
    for body in (garbage, readable):
        await dlx.publish(aio_pika.Message(body, delivery_mode=2), routing_key="")

    out = io.StringIO()
    assert await admin.dead_letters(settings, out, drop_undecodable=True) == (2, 1)

    assert base64.b64encode(garbage).decode() in out.getvalue()
    assert out.getvalue().splitlines()[-1].endswith("1 undecodable one(s) dropped")
    await dead_letter_depth_reaches(amqp, topology, 1)
    replayed, kept = await admin.replay_dead_letters(settings, io.StringIO())
    assert (replayed, kept) == (1, 0)  # the one left is the readable one


async def test_status_never_totals_undeclared_queues_as_an_empty_backlog(
    settings: Settings,
) -> None:
    """A status run with a namespace nothing declared (a typo, another deployment's) must not
    read as "drained"."""
    elsewhere = settings.model_copy(update={"broker_namespace": f"undeclared-{uuid4().hex[:8]}"})
    out = io.StringIO()

    await admin.status(elsewhere, out)

    total = next(line for line in out.getvalue().splitlines() if line.startswith("queued in all"))
    assert total == (
        "queued in all partitions: - (no partition queue is declared under BROKER_NAMESPACE "
        f"{elsewhere.broker_namespace!r})"
    )
