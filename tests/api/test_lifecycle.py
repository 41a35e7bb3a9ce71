"""The box office over HTTP: holds, confirmation, cancellation, per-customer limits and sales
windows, through the API and a real worker on PostgreSQL and RabbitMQ."""

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import aio_pika.abc
import asyncpg
import httpx
import pytest

from shared.errors import BrokerUnavailable
from shared.events.cache import EventCache
from shared.messages import (
    CONFIRM_MARGIN,
    ConfirmRequested,
    PurchaseMessage,
    PurchaseRequested,
)
from shared.publisher import PurchasePublisher
from shared.purchases import repository
from shared.purchases.ids import PurchaseIds
from shared.purchases.models import FailReason, LifecycleAccepted
from shared.purchases.service import LOCATE_WAIT_S
from shared.settings import Settings
from tests.api.helpers import (
    assert_problem,
    partition_queue,
    queue_depth,
    read_messages,
    wait_for_no_consumers,
)
from tests.conftest import StartWorker
from tests.factories import assert_no_oversell, create_event, purchase, wait_until_final
from tests.worker.helpers import wait_for

PROBLEM = "urn:ticketing:problem:"


def soon(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


async def confirm(
    api: httpx.AsyncClient, purchase_id: object, reference: str = "psp-1"
) -> httpx.Response:
    return await api.post(
        f"/purchases/{purchase_id}/confirm", json={"payment_reference": reference}
    )


async def cancel(api: httpx.AsyncClient, purchase_id: object) -> httpx.Response:
    return await api.post(f"/purchases/{purchase_id}/cancel")


async def status_of(api: httpx.AsyncClient, purchase_id: object) -> dict[str, Any]:
    response = await api.get(f"/purchases/{purchase_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_status(api: httpx.AsyncClient, purchase_id: object, wanted: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal seen
        seen = await status_of(api, purchase_id)
        return bool(seen["status"] == wanted)

    await wait_for(reached, timeout_s=30, what=f"purchase {purchase_id} to be {wanted}")
    return seen


async def held_purchase(
    api: httpx.AsyncClient, db: asyncpg.Pool, event: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    response = await purchase(api, event["id"], **kwargs)
    assert response.status_code == 202, response.text
    purchase_id = response.json()["purchase_id"]
    await wait_until_final(db, [purchase_id])
    return await wait_status(api, purchase_id, "held")


async def available(db: asyncpg.Pool, event_id: str) -> int:
    tickets: int = await db.fetchval(
        "SELECT available_tickets FROM events WHERE id = $1", UUID(event_id)
    )
    return tickets


# --- the answers ------------------------------------------------------------------------------


async def test_confirm_is_202_with_location_and_its_message_is_queued_in_the_events_partition(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
) -> None:
    event = await create_event(api, hold_seconds=600)
    worker = await start_worker()
    held = await held_purchase(api, db, event, quantity=2)
    worker.stop()
    await wait_for_no_consumers(amqp, settings)

    response = await confirm(api, held["purchase_id"], "psp-42")

    assert response.status_code == 202, response.text
    body = response.json()
    assert body == {
        "purchase_id": held["purchase_id"],
        "action": "confirm",
        "status_url": f"/purchases/{held['purchase_id']}",
    }
    assert LifecycleAccepted.model_validate(body).model_dump(mode="json") == body
    assert response.headers["location"] == body["status_url"]
    assert response.headers["retry-after"] == "1"
    _, queue = partition_queue(settings, event["id"])
    [message] = [PurchaseMessage.from_body(m.body) for m in await read_messages(amqp, queue, 1)]
    [command] = message.commands
    assert isinstance(command, ConfirmRequested)
    assert str(command.purchase_id) == held["purchase_id"]
    assert command.payment_reference == "psp-42"


@pytest.mark.parametrize("action", ["confirm", "cancel"])
async def test_a_purchase_id_never_issued_is_404(api: httpx.AsyncClient, action: str) -> None:
    response = await api.post(f"/purchases/{uuid4()}/{action}", json={"payment_reference": "psp-1"})
    body = assert_problem(response, 404)
    assert body["type"] == PROBLEM + "purchase-not-found"


@pytest.mark.parametrize("action", ["confirm", "cancel"])
async def test_an_issued_id_nobody_recorded_is_503_after_a_few_reads_of_the_database(
    api: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """An id that passes the check, but that no worker recorded and this replica did not
    accept (another replica's purchase still queued, or a guess under a leaked secret), is
    waited for, then answered 503: after a few reads, not one every 50 ms (a client repeating
    such requests would take the pool)."""
    reads = 0
    read = repository.get_purchase

    async def counted(conn: asyncpg.Connection, purchase_id: UUID) -> Any:
        nonlocal reads
        reads += 1
        return await read(conn, purchase_id)

    monkeypatch.setattr(repository, "get_purchase", counted)
    purchase_id = PurchaseIds(settings.purchase_id_secret).new()

    started = time.monotonic()
    response = await api.post(
        f"/purchases/{purchase_id}/{action}", json={"payment_reference": "psp-1"}
    )

    assert_problem(response, 503)
    assert time.monotonic() - started >= LOCATE_WAIT_S - 0.05
    assert 2 <= reads <= 10, reads


@pytest.mark.parametrize("action", ["confirm", "cancel"])
async def test_a_malformed_purchase_id_is_422(api: httpx.AsyncClient, action: str) -> None:
    response = await api.post(f"/purchases/not-a-uuid/{action}", json={"payment_reference": "p"})
    assert_problem(response, 422)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"payment_reference": ""},
        {"payment_reference": "x" * 201},
        {"payment_reference": "line\nbreak"},
        {"payment_reference": "nul\u0000"},
        # Invisible: a line separator, a zero-width space, a byte-order mark, a no-break space.
        {"payment_reference": "psp\u2028"},
        {"payment_reference": "psp\u200b7f3a"},
        {"payment_reference": "\ufeffpsp"},
        {"payment_reference": "psp\u00a07f3a"},
        {"payment_reference": "ref \u202eevil\u202c"},  # a right-to-left override
        {"payment_reference": "\u200d"},  # nothing that prints but a joiner
        {"payment_reference": 42},
        {"payment_reference": None},
        {"payment_reference": "ok", "extra": 1},
        [],
        "psp",
    ],
)
async def test_a_bad_confirmation_body_is_422_and_nothing_is_queued(
    api: httpx.AsyncClient,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    body: object,
) -> None:
    event = await create_event(api, hold_seconds=600)
    accepted = await purchase(api, event["id"])
    _, queue = partition_queue(settings, event["id"])
    before = await queue_depth(amqp, queue)

    response = await api.post(f"/purchases/{accepted.json()['purchase_id']}/confirm", json=body)

    assert_problem(response, 422)
    assert await queue_depth(amqp, queue) == before


async def test_a_confirmation_body_that_is_not_json_is_400_as_everywhere(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api, hold_seconds=600)
    accepted = await purchase(api, event["id"])
    response = await api.post(
        f"/purchases/{accepted.json()['purchase_id']}/confirm",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert assert_problem(response, 400)["type"] == PROBLEM + "malformed-json"


# --- the lifecycle, applied by the worker ------------------------------------------------------


async def test_a_hold_is_confirmed_with_its_reference_and_confirming_again_changes_nothing(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    await start_worker()

    held = await held_purchase(api, db, event, quantity=3)
    assert held["hold_expires_at"] is not None
    hold_end = datetime.fromisoformat(held["hold_expires_at"])
    given = datetime.fromisoformat(held["processed_at"])  # the hold runs from when it is given
    assert timedelta(seconds=599) <= hold_end - given <= timedelta(seconds=601)
    assert held["confirmed_at"] is None
    assert held["payment_reference"] is None
    assert await available(db, event["id"]) == 7  # held tickets are off sale

    assert (await confirm(api, held["purchase_id"], "psp-7")).status_code == 202
    confirmed = await wait_status(api, held["purchase_id"], "confirmed")
    assert confirmed["payment_reference"] == "psp-7"
    assert confirmed["confirmed_at"] is not None
    assert confirmed["reason"] is None

    again = await confirm(api, held["purchase_id"], "psp-7")
    assert again.status_code == 202, again.text
    other = await confirm(api, held["purchase_id"], "psp-8")
    assert assert_problem(other, 409)["type"] == PROBLEM + "purchase-cannot-be-confirmed"
    assert (await status_of(api, held["purchase_id"]))["payment_reference"] == "psp-7"
    assert await available(db, event["id"]) == 7
    await assert_no_oversell(db)


async def test_a_confirmation_with_another_reference_than_one_on_its_way_is_409(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
) -> None:
    """The worker confirms a purchase once, with the first reference it reads: a second
    reference answered 202 would be dropped, and the buyer's second payment with it."""
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    worker = await start_worker()
    held = await held_purchase(api, db, event)
    raced = await held_purchase(api, db, event)
    worker.stop()  # the confirmations stay queued: none is recorded yet
    await wait_for_no_consumers(amqp, settings)

    first = await confirm(api, held["purchase_id"], "psp-a")
    other = await confirm(api, held["purchase_id"], "psp-b")
    again = await confirm(api, held["purchase_id"], "psp-a")
    racing = await asyncio.gather(
        *(confirm(api, raced["purchase_id"], f"psp-{n}") for n in range(8))
    )

    assert first.status_code == 202, first.text
    problem = assert_problem(other, 409)
    assert problem["type"] == PROBLEM + "purchase-cannot-be-confirmed"
    assert "another payment_reference" in problem["detail"]
    assert again.status_code == 202, again.text
    assert sorted(answer.status_code for answer in racing) == [202] + [409] * 7
    (winner,) = (f"psp-{n}" for n, answer in enumerate(racing) if answer.status_code == 202)
    await start_worker()
    confirmed = await wait_status(api, held["purchase_id"], "confirmed")
    assert confirmed["payment_reference"] == "psp-a"
    assert (await wait_status(api, raced["purchase_id"], "confirmed"))["payment_reference"] == (
        winner
    )


async def test_a_confirmation_that_never_reached_the_queue_blocks_another_reference_no_longer(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A confirmation answered 503 may have been queued all the same (its confirm came late,
    or not at all), so another reference is refused while it could be on its way; once the
    worker has decided everything accepted until then, it is not, and the buyer can pay again."""
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    await start_worker()
    held = await held_purchase(api, db, event)
    publish = PurchasePublisher.publish

    def broker_down(self: PurchasePublisher, *_: Any, **__: Any) -> Any:
        raise BrokerUnavailable("The message broker connection is down; retry shortly.")

    monkeypatch.setattr(PurchasePublisher, "publish", broker_down)
    assert_problem(await confirm(api, held["purchase_id"], "psp-a"), 503)
    monkeypatch.setattr(PurchasePublisher, "publish", publish)
    at_once = await confirm(api, held["purchase_id"], "psp-b")

    async def accepted() -> bool:
        return (await confirm(api, held["purchase_id"], "psp-b")).status_code == 202

    assert_problem(at_once, 409)
    # The idle worker records its partition's horizon once a second.
    await wait_for(accepted, timeout_s=15, what="the other reference to be accepted")
    confirmed = await wait_status(api, held["purchase_id"], "confirmed")
    assert confirmed["payment_reference"] == "psp-b"


async def test_a_purchase_of_an_event_without_holds_needs_no_confirmation(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
) -> None:
    """Its purchases are confirmed as they are decided, without a reference: a confirmation
    would never be applied, so it is refused (409) rather than answered 202, pending or not."""
    event = await create_event(api)  # no hold_seconds
    accepted = await purchase(api, event["id"])
    purchase_id = accepted.json()["purchase_id"]
    _, queue = partition_queue(settings, event["id"])
    before = await queue_depth(amqp, queue)

    pending = await confirm(api, purchase_id)

    problem = assert_problem(pending, 409)
    assert problem["type"] == PROBLEM + "purchase-cannot-be-confirmed"
    assert "needs no confirmation" in problem["detail"]
    assert await queue_depth(amqp, queue) == before  # nothing queued

    await start_worker()
    decided = await wait_status(api, purchase_id, "confirmed")
    assert decided["payment_reference"] is None
    confirmed = assert_problem(await confirm(api, purchase_id), 409)
    assert "needs no confirmation" in confirmed["detail"]
    assert (await status_of(api, purchase_id))["payment_reference"] is None


async def test_cancelling_a_held_or_confirmed_purchase_returns_its_tickets_once(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    await start_worker()
    held = await held_purchase(api, db, event, quantity=2, customer_id="a")
    paid = await held_purchase(api, db, event, quantity=3, customer_id="b")
    assert (await confirm(api, paid["purchase_id"])).status_code == 202
    await wait_status(api, paid["purchase_id"], "confirmed")
    assert await available(db, event["id"]) == 5

    for target in (held, paid):
        response = await cancel(api, target["purchase_id"])
        assert response.status_code == 202, response.text
        assert response.json()["action"] == "cancel"
        cancelled = await wait_status(api, target["purchase_id"], "cancelled")
        assert cancelled["cancelled_at"] is not None
        assert (await cancel(api, target["purchase_id"])).status_code == 202  # idempotent

    assert await available(db, event["id"]) == 10
    assert (await status_of(api, paid["purchase_id"]))["confirmed_at"] is not None
    refused = await confirm(api, held["purchase_id"])
    assert assert_problem(refused, 409)["type"] == PROBLEM + "purchase-cannot-be-confirmed"
    await assert_no_oversell(db)


async def test_a_cancel_right_after_its_purchase_is_applied_after_it(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """Both go through the event's partition in order: the purchase is decided first, then
    cancelled (pending at the API, queued before any worker runs)."""
    event = await create_event(api, total_tickets=5)
    accepted = await purchase(api, event["id"], quantity=2)
    purchase_id = accepted.json()["purchase_id"]
    assert (await cancel(api, purchase_id)).status_code == 202
    await start_worker()

    cancelled = await wait_status(api, purchase_id, "cancelled")
    assert cancelled["confirmed_at"] is not None  # it was confirmed, then cancelled
    assert await available(db, event["id"]) == 5
    await assert_no_oversell(db)


async def test_a_purchase_rejected_or_expired_cannot_be_confirmed_nor_cancelled(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=2, max_tickets_per_purchase=5, hold_seconds=30)
    await start_worker()
    too_many = await purchase(api, event["id"], quantity=5)
    rejected_id = too_many.json()["purchase_id"]
    await wait_status(api, rejected_id, "rejected")
    # Holds of two seconds (the API takes 30 at least; a test need not wait that long).
    await db.execute("UPDATE events SET hold_seconds = 2 WHERE id = $1", UUID(event["id"]))
    held = await held_purchase(api, db, event, quantity=1)
    expired = await wait_status(api, held["purchase_id"], "expired")
    assert expired["reason"] == "hold_expired"

    for purchase_id in (rejected_id, held["purchase_id"]):
        confirmed = await confirm(api, purchase_id)
        assert assert_problem(confirmed, 409)["type"] == PROBLEM + "purchase-cannot-be-confirmed"
        cancelled = await cancel(api, purchase_id)
        assert assert_problem(cancelled, 409)["type"] == PROBLEM + "purchase-cannot-be-cancelled"
    assert await available(db, event["id"]) == 2
    await assert_no_oversell(db)


async def test_a_hold_past_its_end_is_refused_at_the_api(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, hold_seconds=600)
    worker = await start_worker()
    held = await held_purchase(api, db, event)
    worker.stop()
    await db.execute(
        "UPDATE purchases SET hold_expires_at = now() - interval '1 second' WHERE id = $1",
        UUID(held["purchase_id"]),
    )

    assert_problem(await confirm(api, held["purchase_id"]), 409)
    # Nor cancelled: answered 202, it would end expired, not cancelled.
    refused = assert_problem(await cancel(api, held["purchase_id"]), 409)
    assert "hold" in refused["detail"]
    assert (await status_of(api, held["purchase_id"]))["status"] == "held"


async def test_a_cancellation_of_a_hold_must_be_queued_before_the_hold_can_expire(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a confirmation: queued after the hold's end plus CONFIRM_MARGIN, the worker may have
    expired the hold, and a 202 would end `expired`. Its publish is bounded by that instant,
    however long the cancellation waited before it was accepted (a slow event lookup here)."""
    event = await create_event(api, total_tickets=10, hold_seconds=600)
    await start_worker()
    held = await held_purchase(api, db, event)
    deadlines: list[float | None] = []
    publish = PurchasePublisher.publish
    lookup = EventCache.get

    def noting(self: PurchasePublisher, command: Any, *, deadline: float | None = None) -> Any:
        deadlines.append(deadline)
        return publish(self, command, deadline=deadline)

    async def slow_lookup(self: EventCache, event_id: UUID) -> Any:
        await asyncio.sleep(1.0)
        return await lookup(self, event_id)

    monkeypatch.setattr(PurchasePublisher, "publish", noting)
    monkeypatch.setattr(EventCache, "get", slow_lookup)
    ends_at = datetime.fromisoformat(held["hold_expires_at"]) + CONFIRM_MARGIN
    left_s = (ends_at - datetime.now(UTC)).total_seconds()
    asked_at = asyncio.get_running_loop().time()
    accepted = await cancel(api, held["purchase_id"])

    assert accepted.status_code == 202, accepted.text
    (deadline,) = deadlines
    assert deadline is not None
    # The hold's end plus the margin, as the loop counts it: never later.
    assert left_s - 0.2 < deadline - asked_at < left_s + 0.2
    assert (await wait_status(api, held["purchase_id"], "cancelled"))["status"] == "cancelled"


async def test_no_cancellation_once_the_event_has_started(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=5)
    await start_worker()
    accepted = await purchase(api, event["id"])
    purchase_id = accepted.json()["purchase_id"]
    await wait_status(api, purchase_id, "confirmed")
    patched = await api.patch(f"/events/{event['id']}", json={"starts_at": soon(seconds=-60)})
    assert patched.status_code == 200, patched.text

    response = await cancel(api, purchase_id)

    assert assert_problem(response, 409)["type"] == PROBLEM + "purchase-cannot-be-cancelled"
    assert (await status_of(api, purchase_id))["status"] == "confirmed"


async def test_the_per_customer_limit_counts_across_purchases_and_frees_with_a_cancel(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=100, max_tickets_per_customer=4)
    await start_worker()
    first = await purchase(api, event["id"], quantity=3, customer_id="fan")
    second = await purchase(api, event["id"], quantity=2, customer_id="fan")
    other = await purchase(api, event["id"], quantity=4, customer_id="someone-else")
    rows = await wait_until_final(
        db, [r.json()["purchase_id"] for r in (first, second, other)], timeout_s=30
    )
    by_id = {str(k): v for k, v in rows.items()}
    assert by_id[first.json()["purchase_id"]]["status"] == "confirmed"
    assert by_id[second.json()["purchase_id"]]["status"] == "rejected"
    assert by_id[second.json()["purchase_id"]]["reason"] == "customer_limit"
    assert by_id[other.json()["purchase_id"]]["status"] == "confirmed"

    assert (await cancel(api, first.json()["purchase_id"])).status_code == 202
    await wait_status(api, first.json()["purchase_id"], "cancelled")
    again = await purchase(api, event["id"], quantity=4, customer_id="fan")
    await wait_status(api, again.json()["purchase_id"], "confirmed")
    await assert_no_oversell(db)


# --- the sales window --------------------------------------------------------------------------


async def test_a_purchase_before_the_sales_open_is_409_sales_not_open_and_nothing_is_queued(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api, sales_start_at=soon(hours=1))
    _, queue = partition_queue(settings, event["id"])

    response = await purchase(api, event["id"])

    body = assert_problem(response, 409)
    assert body["type"] == PROBLEM + "sales-not-open"
    assert await queue_depth(amqp, queue) == 0


async def test_a_purchase_after_the_sales_close_is_409_sales_closed_and_nothing_is_queued(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api, sales_start_at=soon(hours=-2), sales_end_at=soon(seconds=-1))
    _, queue = partition_queue(settings, event["id"])

    response = await purchase(api, event["id"])

    body = assert_problem(response, 409)
    assert body["type"] == PROBLEM + "sales-closed"
    assert await queue_depth(amqp, queue) == 0


async def test_inside_the_window_a_purchase_is_accepted(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, sales_start_at=soon(hours=-1), sales_end_at=soon(hours=1))
    await start_worker()
    accepted = await purchase(api, event["id"])
    assert accepted.status_code == 202
    await wait_status(api, accepted.json()["purchase_id"], "confirmed")


async def test_the_worker_rechecks_the_window_of_an_event_patched_while_purchases_queued(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """The API's cache may be stale; the worker decides against the window as it is when the
    batch runs, and against when the API accepted each purchase."""
    closing = await create_event(api, total_tickets=50)
    opening = await create_event(api, total_tickets=50)
    early = [await purchase(api, closing["id"], customer_id=f"e{i}") for i in range(5)]
    cut = datetime.now(UTC)
    late = [await purchase(api, closing["id"], customer_id=f"l{i}") for i in range(5)]
    queued = [await purchase(api, opening["id"], customer_id=f"o{i}") for i in range(5)]
    assert all(r.status_code == 202 for r in early + late + queued)
    # While they wait in the queue, sales of one event are closed as of the cut, and those of
    # the other are not open yet.
    closed = await api.patch(f"/events/{closing['id']}", json={"sales_end_at": cut.isoformat()})
    assert closed.status_code == 200, closed.text
    later = await api.patch(f"/events/{opening['id']}", json={"sales_start_at": soon(hours=1)})
    assert later.status_code == 200, later.text
    await start_worker()

    rows = await wait_until_final(db, [r.json()["purchase_id"] for r in early + late + queued])
    outcome = {str(k): (v["status"], v["reason"]) for k, v in rows.items()}
    assert {outcome[r.json()["purchase_id"]] for r in early} == {("confirmed", None)}
    assert {outcome[r.json()["purchase_id"]] for r in late} == {("rejected", "sales_closed")}
    assert {outcome[r.json()["purchase_id"]] for r in queued} == {("rejected", "sales_not_open")}
    assert await available(db, closing["id"]) == 45
    assert await available(db, opening["id"]) == 50
    await assert_no_oversell(db)


async def test_the_worker_rechecks_the_per_purchase_limit_of_an_event_patched_meanwhile(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """Purchases the API accepted under the old limit, still queued when it was lowered: those
    above the new one are rejected (`purchase_limit`), as a stale cache could accept them."""
    event = await create_event(api, total_tickets=50, max_tickets_per_purchase=5)
    small = await purchase(api, event["id"], customer_id="small", quantity=2)
    large = await purchase(api, event["id"], customer_id="large", quantity=5)
    assert small.status_code == large.status_code == 202
    lowered = await api.patch(f"/events/{event['id']}", json={"max_tickets_per_purchase": 2})
    assert lowered.status_code == 200, lowered.text
    await start_worker()

    rows = await wait_until_final(db, [small.json()["purchase_id"], large.json()["purchase_id"]])

    outcome = {str(k): (v["status"], v["reason"]) for k, v in rows.items()}
    assert outcome[small.json()["purchase_id"]] == ("confirmed", None)
    assert outcome[large.json()["purchase_id"]] == ("rejected", "purchase_limit")
    assert await available(db, event["id"]) == 48
    await assert_no_oversell(db)


async def test_a_patched_window_applies_at_the_api_at_once(api: httpx.AsyncClient) -> None:
    event = await create_event(api)
    assert (await purchase(api, event["id"])).status_code == 202
    patched = await api.patch(f"/events/{event['id']}", json={"sales_end_at": soon(seconds=-1)})
    assert patched.status_code == 200, patched.text

    assert assert_problem(await purchase(api, event["id"]), 409)["type"] == PROBLEM + "sales-closed"

    reopened = await api.patch(f"/events/{event['id']}", json={"sales_end_at": None})
    assert reopened.json()["sales_end_at"] is None
    assert (await purchase(api, event["id"])).status_code == 202


async def test_a_retry_of_a_purchase_queued_before_the_sales_closed_is_its_purchase_not_a_409(
    api: httpx.AsyncClient,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    db: asyncpg.Pool,
    start_worker: StartWorker,
) -> None:
    """The 202 was lost, the sale closed, the client retries with its key: the purchase is queued
    (accepted inside the window, so the worker confirms it). A 409 `sales-closed` would tell the
    buyer "nothing queued, do not retry" about tickets they then get."""
    event = await create_event(api)
    first = await purchase(api, event["id"], idempotency_key="lost-202")
    assert first.status_code == 202
    cut = datetime.now(UTC).isoformat()
    patched = await api.patch(f"/events/{event['id']}", json={"sales_end_at": cut})
    assert patched.status_code == 200, patched.text

    retry = await purchase(api, event["id"], idempotency_key="lost-202")

    assert retry.status_code == 202, retry.text
    assert retry.json()["purchase_id"] == first.json()["purchase_id"]
    # Nothing new is published: the first message, already confirmed by the broker, is it.
    _, queue = partition_queue(settings, event["id"])
    assert await queue_depth(amqp, queue) == 1
    await start_worker()
    await wait_status(api, first.json()["purchase_id"], "confirmed")


# --- hostile confirmations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"payment_reference": "' + b"x" * 70_000 + b'"}', "application/json", 413),
        (b"payment_reference=psp", "application/x-www-form-urlencoded", 415),
        (b'{"payment_reference": "psp"}', "text/plain", 415),
        (b'{"payment_reference": "\\ud800"}', "application/json", 422),  # lone surrogate
        (b'{"payment_reference": NaN}', "application/json", 422),
        (b"[" * 10_000, "application/json", 400),
    ],
)
async def test_a_hostile_confirmation_gets_a_clear_4xx(
    api: httpx.AsyncClient, content: bytes, content_type: str, status: int
) -> None:
    event = await create_event(api, hold_seconds=600)
    accepted = await purchase(api, event["id"])
    response = await api.post(
        f"/purchases/{accepted.json()['purchase_id']}/confirm",
        content=content,
        headers={"content-type": content_type},
    )
    assert_problem(response, status)


@pytest.mark.parametrize(
    "reference",
    [
        "'; UPDATE purchases SET status = 'confirmed'; --",
        "🎸 ref שלום ü",
        "👨\u200d👩\u200d👧 🏳️\u200d🌈 \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # joiners
        "x" * 200,
    ],
)
async def test_an_odd_but_valid_payment_reference_is_stored_as_sent(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker, reference: str
) -> None:
    event = await create_event(api, hold_seconds=600)
    await start_worker()
    held = await held_purchase(api, db, event)

    assert (await confirm(api, held["purchase_id"], reference)).status_code == 202
    confirmed = await wait_status(api, held["purchase_id"], "confirmed")
    assert confirmed["payment_reference"] == reference
    assert await db.fetchval("SELECT count(*) FROM purchases") == 1


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        (FailReason.DELIVERY_LIMIT_EXCEEDED, "could not be processed yet"),
        (FailReason.RECORD_CONFLICT, "could not be processed yet"),
        (FailReason.UNDECODABLE_MESSAGE, "will not be decided"),
    ],
)
async def test_a_failed_purchase_is_refused_confirm_and_cancel_saying_whether_it_may_be_decided(
    api: httpx.AsyncClient, db: asyncpg.Pool, reason: FailReason, said: str
) -> None:
    """`failed` is not final (an operator's replay decides it): the 409 must not tell the buyer
    the purchase can never be confirmed or cancelled, but for a message no replay can read."""
    event = await create_event(api, hold_seconds=300)
    accepted = await purchase(api, event["id"])
    body = accepted.json()
    requested = PurchaseRequested(
        purchase_id=UUID(body["purchase_id"]),
        event_id=UUID(event["id"]),
        customer_id=body["customer_id"],
        quantity=body["quantity"],
        accepted_at=datetime.now(UTC),
    )
    async with db.acquire() as conn:
        await repository.record_failed_purchases(conn, [requested], reason=reason)

    confirmed = await api.post(
        f"/purchases/{body['purchase_id']}/confirm", json={"payment_reference": "pay-1"}
    )
    cancelled = await api.post(f"/purchases/{body['purchase_id']}/cancel")

    for answer in (confirmed, cancelled):
        detail = assert_problem(answer, 409)["detail"]
        assert said in detail, detail
        assert "no longer" not in detail, detail
        assert "nothing to" not in detail, detail
