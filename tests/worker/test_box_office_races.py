"""The box office raced against everything else that moves: partitions handed over (a worker
SIGKILLed, one joining, one sent SIGTERM) while holds fall due and their confirmations and
cancellations are queued; cancels racing expiry and confirm; events edited and deleted while
their purchases are decided and their holds expire; and a crash loop that redelivers batches
mixing purchases, confirmations and cancellations. Every test ends with the invariants in SQL
and every purchase's history checked against the state machine."""

import asyncio
import contextlib
import random
import signal
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aio_pika.abc
import asyncpg
import httpx
import pytest

from shared.messages import (
    CancelRequested,
    ConfirmRequested,
    PurchaseMessage,
    PurchaseRequested,
    encode_message,
)
from shared.settings import Settings
from tests.conftest import StartWorker
from tests.factories import assert_no_oversell, create_event, purchase, wait_until_final
from tests.faults.helpers import killed_after_a_commit, worker_process
from tests.metrics import free_port, sample, scrape
from tests.worker.helpers import (
    assert_applied_once,
    create_event_in_partition,
    partition_of,
    publish_raw,
    topology,
    wait_balanced,
    wait_for,
    wait_started,
    worker_processes,
)
from tests.worker.test_box_office import (
    EXPIRY_SLACK_S,
    QUIET,
    assert_moves_allowed,
    assert_paid_iff_accepted,
    cancel,
    confirm,
    record_history,
    set_hold_seconds,
    statuses,
    wait_no_holds,
)
from worker.decision import EventRules, decide

HOLD_S = 3


async def hold_concurrently(
    api: httpx.AsyncClient, db: asyncpg.Pool, event_ids: Sequence[str], per_event: int
) -> list[asyncpg.Record]:
    """`per_event` one-ticket purchases of each event, sent at once (so their holds end within
    moments of each other), waited for until held."""
    answers = await asyncio.gather(
        *(
            purchase(api, event_id, customer_id=f"buyer-{index}")
            for event_id in event_ids
            for index in range(per_event)
        )
    )
    assert all(r.status_code == 202 for r in answers), [r.text for r in answers]
    rows = await wait_until_final(db, [r.json()["purchase_id"] for r in answers])
    assert {row["status"] for row in rows.values()} == {"held"}
    return list(rows.values())


async def at(instant: datetime) -> None:
    await asyncio.sleep(max(0.0, (instant - datetime.now(UTC)).total_seconds()))


async def sold_and_confirmed(db: asyncpg.Pool) -> tuple[int, int]:
    sold = await db.fetchval("SELECT sum(total_tickets - available_tickets) FROM events")
    confirmed = await db.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM purchases WHERE status = 'confirmed'"
    )
    return int(sold), int(confirmed)


# --- cancel against expiry and confirm ---------------------------------------------------------


async def test_cancels_racing_expiry_and_confirms_give_every_ticket_back_exactly_once(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """Every held purchase is cancelled from 1.5 s before to 1.5 s after its hold's end, half of
    them also confirmed around the end at the same time. A cancel ends held and confirmed
    alike, so every purchase ends cancelled or expired and every ticket is back, once: a
    cancel answered before the hold's end cancels it, and a confirmation answered 202 never
    lets the hold expire."""
    await record_history(db)
    events = [await create_event(api, total_tickets=15, hold_seconds=30) for _ in range(2)]
    for event in events:
        await set_hold_seconds(db, event["id"], HOLD_S)
    await start_worker("w-1")
    await start_worker("w-2")
    held = await hold_concurrently(api, db, [e["id"] for e in events], 15)
    rnd = random.Random(21)
    cancels: dict[UUID, tuple[int, datetime]] = {}
    confirms: dict[UUID, int] = {}

    async def race(row: asyncpg.Record) -> None:
        end = row["hold_expires_at"]

        async def drop() -> None:
            await at(end + timedelta(seconds=rnd.uniform(-1.5, 1.5)))
            code = await cancel(api, row["id"])
            cancels[row["id"]] = (code, datetime.now(UTC))

        async def pay() -> None:
            await at(end + timedelta(seconds=rnd.uniform(-1.5, 1.5)))
            confirms[row["id"]] = await confirm(api, row["id"], f"psp-{row['id']}")

        await asyncio.gather(drop(), *([pay()] if rnd.random() < 0.5 else []))

    await asyncio.gather(*(race(row) for row in held))
    await wait_no_holds(db, timeout_s=HOLD_S + EXPIRY_SLACK_S + 10)

    async def all_settled() -> bool:  # a confirmed purchase waits for the cancel behind it
        confirmed: int = await db.fetchval(
            "SELECT count(*) FROM purchases WHERE status = 'confirmed'"
        )
        return confirmed == 0

    await wait_for(all_settled, timeout_s=15, what="every cancel to be applied")
    final = await statuses(db, [row["id"] for row in held])
    ends = {row["id"]: row["hold_expires_at"] for row in held}
    for purchase_id, row in final.items():
        assert row["status"] in ("cancelled", "expired"), dict(row)
        code, answered_at = cancels[purchase_id]
        if code == 202 and answered_at < ends[purchase_id]:
            assert row["status"] == "cancelled", ("cancelled in time, yet", dict(row))
        if confirms.get(purchase_id) == 202:
            assert row["status"] == "cancelled", ("confirmed in time, yet", dict(row))
    sold, confirmed = await sold_and_confirmed(db)
    assert (sold, confirmed) == (0, 0), "every ticket must be back on sale, once"
    paths = await assert_moves_allowed(db)
    print(
        f"cancel answers {dict(Counter(c for c, _ in cancels.values()))}, confirm answers "
        f"{dict(Counter(confirms.values()))}, paths {dict(paths)}"
    )
    assert paths[("held", "expired")] > 0, "no hold expired: the race was not run"
    assert paths[("held", "cancelled")] > 0, "no hold was cancelled: the race was not run"
    await assert_no_oversell(db)


async def test_one_idempotency_key_sent_over_and_over_while_its_purchase_is_held_and_cancelled(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """Retries of one purchase with one Idempotency-Key, every 30 ms, from before the worker
    records it until well after its buyer cancelled it, some with another quantity: those
    queued while it was pending are skipped as decided, later ones answer the same id (or 422
    for another quantity). One row, held once and cancelled once, the tickets back."""
    await record_history(db)
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    await start_worker("w-1")
    rnd = random.Random(8)
    answers: list[httpx.Response] = []
    after_cancel = 0  # retries answered once the cancel was
    cancelling: asyncio.Task[None] | None = None

    async def drop(purchase_id: UUID) -> None:
        await wait_until_final(db, [purchase_id])
        assert await cancel(api, purchase_id) == 202

    async def retry() -> None:
        nonlocal cancelling, after_cancel
        quantity = 2 if rnd.random() < 0.8 else 3
        response = await purchase(
            api, event["id"], quantity=quantity, customer_id="alice", idempotency_key="k-race"
        )
        answers.append(response)
        if cancelling is None and response.status_code == 202:
            cancelling = asyncio.create_task(drop(UUID(response.json()["purchase_id"])))
        elif cancelling is not None and cancelling.done():
            after_cancel += 1

    retries: list[asyncio.Task[None]] = []
    while cancelling is None or not cancelling.done() or after_cancel < 10:
        retries.append(asyncio.create_task(retry()))
        await asyncio.sleep(0.03)
    await asyncio.gather(*retries, cancelling)
    ids = {r.json()["purchase_id"] for r in answers if r.status_code == 202}
    assert len(ids) == 1, ids
    assert {r.status_code for r in answers} <= {202, 422}, [r.text for r in answers]
    purchase_id = UUID(ids.pop())
    marker = await purchase(api, event["id"], customer_id="bob")
    await wait_until_final(db, [marker.json()["purchase_id"]])

    rows = await db.fetch("SELECT * FROM purchases WHERE customer_id = 'alice'")
    assert [(r["id"], r["status"]) for r in rows] == [(purchase_id, "cancelled")]
    history = await db.fetch(
        "SELECT status FROM purchase_history WHERE id = $1 ORDER BY seq", purchase_id
    )
    assert [r["status"] for r in history] == ["held", "cancelled"]
    sold, _ = await sold_and_confirmed(db)
    assert sold == 1  # bob's hold only
    codes = Counter(r.status_code for r in answers)
    print(f"retry answers {dict(codes)}, {after_cancel} after the cancel")
    await assert_no_oversell(db)


# --- partitions handed over while holds fall due -------------------------------------------------


@pytest.mark.slow
async def test_holds_falling_due_while_partitions_change_hands_confirm_iff_paid_in_time(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, tmp_path: Path
) -> None:
    """Holds in every partition end together. Around their end, each buyer confirms or cancels
    (from 1.5 s before to 1.5 s after), while one worker is SIGKILLed (its confirmations wait in
    the queue for its leases to expire), a third joins (partitions move to it) and another is
    sent SIGTERM (it hands its partitions over). A confirmation answered 202 confirms, one
    refused (409) expires, a cancel answered before the end cancels; the tickets sold are the
    confirmed ones exactly."""
    await record_history(db)
    partitions = topology(settings).partitions
    events = [
        await create_event_in_partition(api, settings, p, total_tickets=12, hold_seconds=30)
        for p in range(partitions)
    ]
    for event in events:
        await set_hold_seconds(db, event["id"], HOLD_S + 1)
    names = ["w-a", "w-b"]
    async with worker_processes(settings, tmp_path) as spawn:
        workers = {name: await spawn(name, **QUIET) for name in names}
        await wait_started(db, list(workers.values()))
        await wait_balanced(db, partitions, names, timeout_s=30)
        held = await hold_concurrently(api, db, [e["id"] for e in events], 10)
        first_end = min(row["hold_expires_at"] for row in held)
        rnd = random.Random(5)
        plans = {row["id"]: "cancel" if rnd.random() < 0.25 else "pay" for row in held}
        answers: dict[UUID, tuple[int, datetime]] = {}

        async def settle(row: asyncpg.Record) -> None:
            await at(row["hold_expires_at"] + timedelta(seconds=rnd.uniform(-1.5, 1.5)))
            if plans[row["id"]] == "pay":
                code = await confirm(api, row["id"], f"psp-{row['id']}")
            else:
                code = await cancel(api, row["id"])
            answers[row["id"]] = (code, datetime.now(UTC))

        async def hand_over() -> None:
            await at(first_end - timedelta(seconds=1.5))
            workers["w-b"].send(signal.SIGKILL)
            workers["w-c"] = await spawn("w-c", **QUIET)
            await at(first_end + timedelta(seconds=0.5))
            workers["w-a"].send(signal.SIGTERM)

        await asyncio.gather(hand_over(), *(settle(row) for row in held))
        assert await workers["w-a"].wait(30) == 0, workers["w-a"].log()[-3000:]
        await wait_balanced(db, partitions, ["w-c"], timeout_s=30)
        await wait_no_holds(db, timeout_s=HOLD_S + EXPIRY_SLACK_S + 15)
        assert workers["w-c"].running

    final = await statuses(db, [row["id"] for row in held])
    ends = {row["id"]: row["hold_expires_at"] for row in held}
    for purchase_id, (code, answered_at) in answers.items():
        status = final[purchase_id]["status"]
        if plans[purchase_id] == "pay":
            assert_paid_iff_accepted(final[purchase_id], code)
        elif code == 202 and answered_at < ends[purchase_id]:
            assert status == "cancelled", (purchase_id, status)
        else:
            assert status in ("cancelled", "expired"), (purchase_id, status)
    codes = Counter((plans[p], code) for p, (code, _) in answers.items())
    paths = await assert_moves_allowed(db)
    print(f"answers {dict(codes)}, paths {dict(paths)}")
    assert codes[("pay", 202)] > 0, "no confirmation made it in time: the race was not run"
    assert codes[("pay", 409)] > 0, "no confirmation came too late: the race was not run"
    sold, confirmed = await sold_and_confirmed(db)
    assert sold == confirmed
    await assert_applied_once(db, [row["id"] for row in held])
    await assert_no_oversell(db)


# --- events edited and deleted mid-sale ----------------------------------------------------------


async def test_events_edited_while_holds_are_given_confirmed_cancelled_and_expire(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """PATCH /events, over and over, while buyers hold, pay, cancel and abandon: the total cut
    to exactly what is taken (so every ticket given back by an expiry or a cancel is the only
    one on sale) and raised again, the per-customer limit raised, the sales window and the
    hold moved. After every edit, and at the end, available + held + confirmed = total."""
    await record_history(db)
    event = await create_event(
        api,
        total_tickets=20,
        max_tickets_per_purchase=2,
        max_tickets_per_customer=2,
        hold_seconds=30,
    )
    event_id = event["id"]
    await set_hold_seconds(db, event_id, 2)
    await start_worker("w-1")
    await start_worker("w-2")
    accepted: dict[UUID, int] = {}
    plans: dict[UUID, str] = {}
    answers: dict[UUID, int] = {}
    done = asyncio.Event()

    async def buyer(index: int) -> None:
        rnd = random.Random(3_000 + index)
        await asyncio.sleep(index * 0.04)
        quantity = rnd.randint(1, 2)
        response = await purchase(api, event_id, quantity=quantity, customer_id=f"fan-{index % 40}")
        if response.status_code != 202:
            assert response.status_code in (409, 422), response.text
            return
        purchase_id = UUID(response.json()["purchase_id"])
        accepted[purchase_id] = quantity
        row = (await wait_until_final(db, [purchase_id]))[purchase_id]
        if row["status"] != "held":
            return
        roll = rnd.random()
        plans[purchase_id] = "abandon" if roll < 0.3 else "cancel" if roll < 0.5 else "pay"
        await asyncio.sleep(rnd.uniform(0.0, 0.5))
        if plans[purchase_id] == "pay":
            answers[purchase_id] = await confirm(api, purchase_id, f"psp-{index}")
        elif plans[purchase_id] == "cancel":
            answers[purchase_id] = await cancel(api, purchase_id)

    async def editor() -> Counter[int]:
        rnd = random.Random(99)
        codes: Counter[int] = Counter()
        limit = 2
        while not done.is_set():
            current = (await api.get(f"/events/{event_id}")).json()
            taken = current["total_tickets"] - current["available_tickets"]
            choice = rnd.choice(["cut", "raise", "limit", "window", "hold"])
            body: dict[str, Any]
            if choice == "cut":
                body = {"total_tickets": max(1, taken)}  # 409 if more was taken meanwhile
            elif choice == "raise":
                body = {"total_tickets": current["total_tickets"] + rnd.randint(1, 4)}
            elif choice == "limit":
                limit += 1
                body = {"max_tickets_per_customer": limit}
            elif choice == "window":
                body = {"sales_end_at": "2027-06-01T00:00:00+00:00", "sales_start_at": None}
            else:
                body = {"hold_seconds": None}  # purchases decided meanwhile: confirmed at once
            response = await api.patch(f"/events/{event_id}", json=body)
            assert response.status_code in (200, 409), response.text
            codes[response.status_code] += 1
            if choice == "hold":  # holds again, short ones (the API allows 30 s at least)
                await set_hold_seconds(db, event_id, 2)
            await assert_no_oversell(db)
            await asyncio.sleep(0.02)
        return codes

    editing = asyncio.create_task(editor())
    await asyncio.gather(*(buyer(i) for i in range(150)))
    done.set()
    codes = await editing
    await wait_until_final(db, list(accepted))
    await wait_no_holds(db, timeout_s=2 + EXPIRY_SLACK_S + 10)

    final = await statuses(db, list(accepted))
    for purchase_id, plan in plans.items():
        status = final[purchase_id]["status"]
        code = answers.get(purchase_id)
        if plan == "abandon":
            assert status == "expired", (plan, status)
        elif plan == "pay" and code == 202:
            assert status == "confirmed", (plan, status)
        elif plan == "cancel" and code == 202:
            assert status in ("cancelled", "expired"), (plan, status)
    sold, confirmed = await sold_and_confirmed(db)
    outcome = Counter(row["status"] for row in final.values())
    print(f"edits {dict(codes)}, purchases {dict(outcome)}")
    assert sold == confirmed
    assert codes[200] > 20, "too few edits landed: the race was not run"
    assert outcome["expired"] > 0
    assert outcome["cancelled"] > 0
    assert outcome["confirmed"] > 0
    await assert_applied_once(db, list(accepted), accepted)
    await assert_no_oversell(db)
    await assert_moves_allowed(db)


async def test_events_deleted_while_their_first_purchases_are_decided(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """DELETE /events races the worker's first commit of each event's purchases: the delete
    wins (204, every purchase then rejected event_not_found) or loses (409, the purchases
    recorded); never an event gone with tickets taken, nor a purchase left undecided."""
    events = [await create_event(api, total_tickets=5, hold_seconds=30) for _ in range(20)]
    accepted: dict[UUID, str] = {}
    for event in events:
        for index in range(3):
            response = await purchase(api, event["id"], customer_id=f"c-{index}")
            assert response.status_code == 202, response.text
            accepted[UUID(response.json()["purchase_id"])] = event["id"]
    rnd = random.Random(4)

    async def delete(event_id: str) -> int:
        await asyncio.sleep(rnd.uniform(0.0, 1.5))
        response = await api.delete(f"/events/{event_id}")
        assert response.status_code in (204, 409), response.text
        return response.status_code

    await start_worker("w-1")
    codes = dict(
        zip(
            [e["id"] for e in events],
            await asyncio.gather(*(delete(e["id"]) for e in events)),
            strict=True,
        )
    )
    rows = await wait_until_final(db, list(accepted))
    for purchase_id, event_id in accepted.items():
        row = rows[purchase_id]
        if codes[event_id] == 204:
            assert (row["status"], row["reason"]) == ("rejected", "event_not_found"), dict(row)
        else:
            assert row["status"] == "held", dict(row)
    remaining = {str(r["id"]) for r in await db.fetch("SELECT id FROM events")}
    assert remaining == {e for e, code in codes.items() if code == 409}
    print(f"deletes {dict(Counter(codes.values()))}")
    await assert_applied_once(db, list(accepted))
    await assert_no_oversell(db)


# --- redelivered batches of mixed commands -------------------------------------------------------


@pytest.mark.slow
async def test_batches_mixing_purchases_confirms_and_cancels_redelivered_after_kills_apply_once(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
) -> None:
    """A queued backlog of purchases, confirmations, cancellations and repeated purchases, three
    commands a message, of an event with fewer tickets than asked for (so a ticket given back
    by a cancel goes to a later buyer). A worker is SIGKILLed right after it commits, again and
    again, so batches are redelivered to the next incarnation. The outcome must be exactly the
    decision's replay of the whole queue in order: nothing applied twice, nothing skipped."""
    await record_history(db)
    event = await create_event(api, total_tickets=150, max_tickets_per_purchase=3, hold_seconds=600)
    event_id = UUID(event["id"])
    partition = partition_of(settings, event["id"])
    rnd = random.Random(17)
    commands: list[PurchaseRequested | ConfirmRequested | CancelRequested] = []
    bought: list[PurchaseRequested] = []
    started = datetime.now(UTC)
    for index in range(360):
        accepted_at = started + timedelta(milliseconds=index)
        roll = rnd.random()
        command: PurchaseRequested | ConfirmRequested | CancelRequested
        if roll < 0.5 or not bought:
            bought.append(
                PurchaseRequested(
                    purchase_id=uuid4(),
                    event_id=event_id,
                    customer_id=f"c-{index}",
                    quantity=rnd.randint(1, 3),
                    accepted_at=accepted_at,
                )
            )
            command = bought[-1]
        elif roll < 0.75:
            command = ConfirmRequested(
                purchase_id=rnd.choice(bought).purchase_id,
                event_id=event_id,
                payment_reference=f"psp-{index}",
                accepted_at=accepted_at,
            )
        elif roll < 0.92:
            command = CancelRequested(
                purchase_id=rnd.choice(bought).purchase_id,
                event_id=event_id,
                accepted_at=accepted_at,
            )
        else:  # a purchase sent again (an Idempotency-Key retry)
            command = rnd.choice(bought).model_copy(update={"accepted_at": accepted_at})
        commands.append(command)
    # Last in the queue: once it is decided, so is everything before it.
    marker = PurchaseRequested(
        purchase_id=uuid4(),
        event_id=event_id,
        customer_id="marker",
        quantity=1,
        accepted_at=started + timedelta(milliseconds=len(commands)),
    )
    commands.append(marker)
    bought.append(marker)
    for offset in range(0, len(commands), 3):
        message = PurchaseMessage(partition=partition, commands=commands[offset : offset + 3])
        await publish_raw(
            amqp, settings, partition, encode_message(message.partition, message.commands)
        )

    quiet = settings.model_copy(update={"log_level": "WARNING"})
    crashing = quiet.model_copy(update={"batch_size": 4})
    redelivered = 0
    for _ in range(4):
        text = await killed_after_a_commit(crashing, "crashing-worker")
        redelivered += int(sample(text, "ticketing_worker_redeliveries_total"))
    port = free_port()
    async with worker_process(quiet, "crashing-worker", port):
        await wait_until_final(db, [marker.purchase_id], timeout_s=60)
        with contextlib.suppress(OSError):
            redelivered += int(sample(scrape(port), "ticketing_worker_redeliveries_total"))
    rows = await statuses(db, [p.purchase_id for p in bought])

    # The replay: the whole queue through the decision, in order, from the event's total.
    rules = {
        event_id: EventRules(
            available=150,
            starts_at=datetime.fromisoformat(event["starts_at"]),
            max_tickets_per_purchase=3,
            hold_seconds=600,
        )
    }
    outcome = decide(rules, {}, {}, commands, now=datetime.now(UTC))
    expected = {
        d.purchase.purchase_id: (d.status.value, d.reason.value if d.reason else None)
        for d in outcome.decisions
    }
    got = {pid: (row["status"], row["reason"]) for pid, row in rows.items()}
    assert got == expected
    available = await db.fetchval("SELECT available_tickets FROM events WHERE id = $1", event_id)
    assert available == outcome.available[event_id]
    print(f"redelivered messages: {redelivered}, outcome {dict(Counter(got.values()))}")
    assert redelivered > 0, "no kill left a delivered message unacked: redelivery never ran"
    await assert_applied_once(db, [p.purchase_id for p in bought])
    await assert_no_oversell(db)
    await assert_moves_allowed(db)
