"""Status without polling: long-poll (`?wait=`, `If-None-Match`), server-sent events and the
ETag, answered when the worker's commit is announced (NOTIFY), against real commits."""

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest

from api.main import create_app
from api.openapi import render
from shared import broker_nodes
from shared.purchases import repository
from shared.purchases.service import PurchaseService
from shared.settings import Settings
from tests.api.helpers import assert_problem, served_api, wait_for_no_consumers
from tests.conftest import StartWorker, api_client
from tests.factories import create_event, purchase, wait_until_final
from tests.faults.proxy import proxy_for, through
from tests.metrics import sample
from tests.worker.helpers import partition_of, wait_for


async def long_poll(
    api: httpx.AsyncClient, purchase_id: object, wait: float, **headers: str
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await api.get(
        f"/purchases/{purchase_id}", params={"wait": wait}, headers=headers, timeout=60
    )
    return response, time.monotonic() - started


async def queued_purchase(api: httpx.AsyncClient, **event: Any) -> str:
    created = await create_event(api, **event)
    accepted = await purchase(api, created["id"])
    assert accepted.status_code == 202, accepted.text
    purchase_id: str = accepted.json()["purchase_id"]
    return purchase_id


class Calls:
    count = 0


def counting(owner: object, name: str, monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Count the calls of the coroutine function `owner.name` from now on."""
    calls = Calls()
    real = getattr(owner, name)

    async def counted(*args: Any) -> Any:
        calls.count += 1
        return await real(*args)

    monkeypatch.setattr(owner, name, counted)
    return calls


def sse_events(text: str) -> list[dict[str, str]]:
    """The events of a text/event-stream body (comments dropped)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            events.append(fields)
    return events


# --- the ETag and the parameter -----------------------------------------------------------------


async def test_every_status_answer_carries_its_status_as_etag(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api)
    for params in ({}, {"wait": 0}):  # the fast path and the route
        pending = await api.get(f"/purchases/{purchase_id}", params=params)
        assert pending.headers["etag"] == '"pending"'
        assert pending.headers["retry-after"] == "1"
    await start_worker()
    await wait_until_final(db, [purchase_id])
    for params in ({}, {"wait": 0}):
        decided = await api.get(f"/purchases/{purchase_id}", params=params)
        assert decided.headers["etag"] == '"confirmed"'
        assert "retry-after" not in decided.headers


async def test_no_status_answer_may_be_stored_by_a_browser(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """A browser that stored a status answer revalidates the next identical request with its
    ETag as If-None-Match, which a long-poll reads as "hold until the status changes": a page
    asking again for a held purchase would wait out its whole `wait`."""
    purchase_id = await queued_purchase(api)
    for params in ({}, {"wait": 0}, {"wait": 0, "unused": 1}):  # fast path, long-poll, route
        pending = await api.get(f"/purchases/{purchase_id}", params=params)
        assert pending.headers["cache-control"] == "no-store"
    await start_worker()
    await wait_until_final(db, [purchase_id])
    for params in ({}, {"wait": 0}, {"wait": 0, "unused": 1}):
        decided = await api.get(f"/purchases/{purchase_id}", params=params)
        assert decided.status_code == 200
        assert decided.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("wait", ["-1", "30.001", "31", "abc", "nan", "inf", ""])
async def test_a_wait_outside_0_to_30_seconds_is_422(api: httpx.AsyncClient, wait: str) -> None:
    purchase_id = await queued_purchase(api)
    response = await api.get(f"/purchases/{purchase_id}?wait={wait}")
    problem = assert_problem(response, 422)
    assert "wait" in problem["detail"]


async def test_a_never_issued_id_is_404_at_once_even_with_wait(api: httpx.AsyncClient) -> None:
    response, seconds = await long_poll(api, uuid4(), 10)
    assert_problem(response, 404)
    assert seconds < 5


# --- long-poll -----------------------------------------------------------------------------------


async def test_a_long_poll_is_answered_when_the_decision_commits_not_at_the_timeout(
    api: httpx.AsyncClient, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api)
    waiting = asyncio.create_task(long_poll(api, purchase_id, 25))
    await asyncio.sleep(1.0)
    assert not waiting.done(), "answered while still pending"
    await start_worker()

    response, seconds = await waiting
    assert response.status_code == 200
    assert response.json()["status"] == "confirmed"
    assert response.headers["etag"] == '"confirmed"'
    assert seconds < 15, f"answered after {seconds:.1f} s: at the timeout, not at the commit"


async def test_a_long_poll_on_a_pending_purchase_answers_pending_after_the_wait(
    api: httpx.AsyncClient,
) -> None:
    purchase_id = await queued_purchase(api)
    response, seconds = await long_poll(api, purchase_id, 1.5)
    assert response.status_code == 200
    assert response.json()["status"] == "pending"
    assert response.headers["etag"] == '"pending"'
    assert 1.4 <= seconds < 10


async def test_if_none_match_holds_a_held_purchase_until_it_is_confirmed(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api, hold_seconds=600)
    await start_worker()
    held, _ = await long_poll(api, purchase_id, 25)
    assert held.json()["status"] == "held"
    waiting = asyncio.create_task(long_poll(api, purchase_id, 25, **{"If-None-Match": '"held"'}))
    await asyncio.sleep(1.0)
    assert not waiting.done(), "answered while the status was still the one the client has"
    paid = await api.post(f"/purchases/{purchase_id}/confirm", json={"payment_reference": "p-1"})
    assert paid.status_code == 202

    response, seconds = await waiting
    assert response.json()["status"] == "confirmed"
    assert response.headers["etag"] == '"confirmed"'
    assert seconds < 15


async def test_a_status_other_than_if_none_match_is_answered_at_once(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api)
    await start_worker()
    await wait_until_final(db, [purchase_id])
    response, seconds = await long_poll(api, purchase_id, 20, **{"If-None-Match": 'W/"pending"'})
    assert response.json()["status"] == "confirmed"
    assert seconds < 5


async def test_past_its_bound_of_waiters_a_process_answers_at_once(settings: Settings) -> None:
    async with api_client(settings.model_copy(update={"status_max_waiters": 1})) as api:
        first_id, second_id = await queued_purchase(api), await queued_purchase(api)
        held = asyncio.create_task(long_poll(api, first_id, 3))
        await asyncio.sleep(0.5)
        response, seconds = await long_poll(api, second_id, 20)
        assert response.json()["status"] == "pending"
        assert seconds < 2, "held beyond the process's bound of waiters"
        await held


async def test_once_the_process_is_stopping_no_status_request_is_held(settings: Settings) -> None:
    """release_waiters() is what a stop signal runs (api/draining.py): held long-polls answer
    with the status as it stands, and a new one is answered at once."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api,
    ):
        first_id, second_id = await queued_purchase(api), await queued_purchase(api)
        held = asyncio.create_task(long_poll(api, first_id, 20))
        await asyncio.sleep(0.5)
        assert not held.done()

        app.state.resources.purchases.release_waiters()
        answered, held_s = await held
        later, later_s = await long_poll(api, second_id, 20)

    assert answered.json()["status"] == later.json()["status"] == "pending"
    assert held_s < 2, "the held long-poll waited on after the release"
    assert later_s < 2, "a long-poll was held while the process is stopping"


async def test_the_listener_connection_killed_mid_wait_loses_no_waiter(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    start_worker: StartWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = [await queued_purchase(api) for _ in range(5)]
    waiting = [asyncio.create_task(long_poll(api, i, 25)) for i in ids]
    await asyncio.sleep(0.5)
    with caplog.at_level(logging.WARNING, logger="shared.purchases.changes"):
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'ticketing-status-listener'"
        )
        assert killed == 1, "the API process should hold exactly one listener connection"
        await start_worker()

        answers = await asyncio.gather(*waiting)
    assert [r.json()["status"] for r, _ in answers] == ["confirmed"] * 5
    assert max(seconds for _, seconds in answers) < 20
    # An operator sees the loss: the server ending the connection is no quieter than an error.
    assert any("status listener connection lost" in r.getMessage() for r in caplog.records)


@pytest.mark.faults
async def test_postgresql_going_away_mid_wait_loses_no_waiter(
    settings: Settings, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """Every connection of the API dropped and refused for a while (as a restart does), then
    back: the waiting requests are answered with the decision all the same."""
    async with proxy_for(settings.database_url, 5432) as proxy:
        cut_off = settings.model_copy(
            update={"database_url": through(settings.database_url, proxy.port)}
        )
        async with api_client(cut_off) as api:
            ids = [await queued_purchase(api) for _ in range(5)]
            waiting = [asyncio.create_task(long_poll(api, i, 28)) for i in ids]
            await asyncio.sleep(0.5)
            proxy.cut()
            await asyncio.sleep(2.0)
            await start_worker()  # decides meanwhile, on a direct connection
            await wait_until_final(db, [UUID(i) for i in ids])
            proxy.restore()
            answers = await asyncio.gather(*waiting)
    statuses = [r.json()["status"] if r.status_code == 200 else r.status_code for r, _ in answers]
    assert statuses == ["confirmed"] * 5


async def test_two_thousand_waiting_clients_are_each_answered_with_their_final_status(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=1_500, max_tickets_per_purchase=1)
    accepted = await asyncio.gather(
        *(purchase(api, event["id"], customer_id=f"c-{i}") for i in range(2_000))
    )
    ids = [r.json()["purchase_id"] for r in accepted if r.status_code == 202]
    assert len(ids) == 2_000
    semaphore = asyncio.Semaphore(2_000)

    async def wait_one(purchase_id: str) -> str:
        async with semaphore:
            response, _ = await long_poll(api, purchase_id, 30)
        status: str = response.json()["status"]
        return status

    waiting = [asyncio.create_task(wait_one(i)) for i in ids]
    await asyncio.sleep(1.0)
    await start_worker()
    statuses = await asyncio.gather(*waiting)
    assert statuses.count("confirmed") == 1_500
    assert statuses.count("rejected") == 500
    rows = await db.fetch("SELECT status FROM purchases")
    assert len(rows) == 2_000


# --- server-sent events --------------------------------------------------------------------------


async def test_the_stream_sends_the_status_then_each_change_and_ends_when_settled(
    settings: Settings, start_worker: StartWorker
) -> None:
    async with served_api(settings) as api:
        await following_a_hold_until_cancelled(api, start_worker)


async def following_a_hold_until_cancelled(
    api: httpx.AsyncClient, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api, hold_seconds=600)
    await start_worker()
    async with api.stream("GET", f"/purchases/{purchase_id}/events", timeout=60) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        received, cancel_sent = "", False
        async for chunk in stream.aiter_text():
            received += chunk
            statuses = [e["id"] for e in sse_events(received)]
            if statuses and statuses[-1] == "held" and not cancel_sent:
                cancel_sent = True
                cancelled = await api.post(f"/purchases/{purchase_id}/cancel")
                assert cancelled.status_code == 202
    events = sse_events(received)
    assert [e["event"] for e in events] == ["status"] * len(events)
    statuses = [e["id"] for e in events]
    assert statuses[-1] == "cancelled", statuses
    assert "held" in statuses
    assert statuses == list(dict.fromkeys(statuses)), "a status was sent twice"
    assert json.loads(events[-1]["data"])["status"] == "cancelled"


async def test_a_reconnect_with_last_event_id_is_not_sent_what_it_has(
    settings: Settings, api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api, hold_seconds=600)
    await start_worker()
    await wait_until_final(db, [purchase_id])
    short = settings.model_copy(update={"status_stream_max_s": 1.5, "status_heartbeat_s": 0.5})
    async with served_api(short) as other:
        response = await other.get(
            f"/purchases/{purchase_id}/events", headers={"Last-Event-ID": "held"}, timeout=30
        )
    assert response.status_code == 200
    assert sse_events(response.text) == [], "the held status was sent again"
    assert ": heartbeat" in response.text


async def test_streams_ended_together_are_asked_to_reconnect_at_spread_out_times(
    settings: Settings,
) -> None:
    """A stopping replica ends every stream it holds at once; with EventSource's own delay
    (about 3 s) all of them would reconnect, to the replicas left, within the same moment."""
    short = settings.model_copy(update={"status_stream_max_s": 0.5, "status_heartbeat_s": 0.2})
    async with served_api(short) as api:
        purchase_ids = [await queued_purchase(api) for _ in range(3)]
        streams = await asyncio.gather(
            *(
                api.get(f"/purchases/{purchase_id}/events", timeout=30)
                for purchase_id in purchase_ids
                for _ in range(10)
            )
        )
    delays = [int(e["retry"]) for stream in streams for e in sse_events(stream.text)]
    assert len(delays) >= 30, "every status event names its reconnection delay"
    assert all(1_000 <= delay <= 5_000 for delay in delays)
    assert len(set(delays)) >= 20, "the delays are spread, not one for all"


async def test_a_stream_ends_after_its_lifetime_with_heartbeats_meanwhile(
    settings: Settings,
) -> None:
    short = settings.model_copy(update={"status_stream_max_s": 1.2, "status_heartbeat_s": 0.3})
    async with served_api(short) as api:
        purchase_id = await queued_purchase(api)
        started = time.monotonic()
        response = await api.get(f"/purchases/{purchase_id}/events", timeout=30)
        seconds = time.monotonic() - started
    events = sse_events(response.text)
    # A purchase this replica accepted: each heartbeat is the purchase again, with the wait
    # ahead of it now (another replica's stream sends comments: see the reconnect test).
    assert [e["id"] for e in events][:3] == ["pending"] * 3
    assert {e["id"] for e in events} == {"pending"}
    assert 1.0 <= seconds < 10


@pytest.mark.parametrize("database", ["stalls", "cancels"])
async def test_a_pending_streams_heartbeat_keeps_its_pace_whatever_the_database_does(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    """The wait ahead a heartbeat sends needs a read: a database that stalls or cancels it
    leaves the heartbeat a comment, never a stream without a byte for the read's whole timeout,
    nor one cut short."""

    async def stalls(*_: Any) -> None:
        await asyncio.sleep(3600)

    async def cancels(*_: Any) -> None:
        raise asyncpg.QueryCanceledError("canceling statement due to statement timeout")

    short = settings.model_copy(update={"status_stream_max_s": 2.5, "status_heartbeat_s": 0.3})
    async with served_api(short) as api:
        purchase_id = await queued_purchase(api)
        monkeypatch.setattr(
            PurchaseService, "still_pending", stalls if database == "stalls" else cancels
        )
        started = time.monotonic()
        response = await api.get(f"/purchases/{purchase_id}/events", timeout=30)
        seconds = time.monotonic() - started
    assert response.status_code == 200
    assert [e["id"] for e in sse_events(response.text)] == ["pending"]
    assert response.text.count(": heartbeat") >= 2
    assert seconds < 6


async def test_a_pending_purchases_stream_shows_the_wait_ahead_shrink_as_the_worker_advances(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    """Events are sent on a change of status, and a pending purchase's wait ahead changes while
    its status does not: each heartbeat brings the wait ahead now, or a page would show the
    first estimate until the purchase is decided."""
    event = await event_with_a_stopped_worker(api, db, settings, start_worker)
    await asyncio.sleep(1.0)  # a second of accepted time undecided ahead of what comes next
    short = settings.model_copy(update={"status_stream_max_s": 2.5, "status_heartbeat_s": 0.3})
    async with served_api(short) as replica:
        purchase_id = (await purchase(replica, event["id"])).json()["purchase_id"]
        accepted_at = (await replica.get(f"/purchases/{purchase_id}")).json()["accepted_at"]
        received = ""
        async with replica.stream("GET", f"/purchases/{purchase_id}/events", timeout=30) as stream:
            async for chunk in stream.aiter_text():
                first = not received
                received += chunk
                if first:  # the worker decides all that was ahead of it
                    await db.execute(
                        "UPDATE partition_progress SET horizon = $2, recorded_at = now() "
                        "WHERE partition = $1",
                        partition_of(settings, event["id"]),
                        datetime.fromisoformat(accepted_at),
                    )
    events = [json.loads(e["data"]) for e in sse_events(received)]
    assert {e["status"] for e in events} == {"pending"}
    assert events[0]["queue"]["ahead_s"] >= 1.0
    assert events[-1]["queue"]["ahead_s"] == pytest.approx(0.0, abs=0.01)


async def test_a_stream_reads_its_purchase_twice_however_many_changes_it_follows(
    settings: Settings, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once to answer 404 before the stream starts, once when its waiter is in place; every
    change after that comes with the purchase as the listener read it for all its waiters."""
    reads = counting(PurchaseService, "status", monkeypatch)
    async with served_api(settings) as api:
        purchase_id = await queued_purchase(api, hold_seconds=600)
        received, statuses = "", []
        async with api.stream("GET", f"/purchases/{purchase_id}/events", timeout=60) as stream:
            async for chunk in stream.aiter_text():
                received += chunk
                statuses = [e["id"] for e in sse_events(received)]
                if statuses == ["pending"]:
                    await asyncio.sleep(0.3)  # the stream waits, its waiter in place
                    await start_worker()
                elif statuses == ["pending", "held"]:
                    assert (await api.post(f"/purchases/{purchase_id}/cancel")).status_code == 202
    assert statuses == ["pending", "held", "cancelled"]
    assert reads.count == 2, f"{reads.count} reads of a purchase followed through 2 changes"


@pytest.mark.parametrize("query", ["", "?via=route"], ids=["dispatched", "routed"])
async def test_a_stream_whose_client_leaves_lets_go_of_its_waiter_at_once(
    settings: Settings, query: str
) -> None:
    """Heartbeats are 15 s apart and uvicorn writes to a closed connection without complaint:
    the stream notices the client leaving by itself, and stops holding a waiter then."""
    app = create_app(settings)
    async with served_api(settings, app) as api:
        waiters = app.state.resources.waiters
        purchase_id = await queued_purchase(api)
        async with api.stream("GET", f"/purchases/{purchase_id}/events{query}") as stream:
            first = await anext(stream.aiter_text())
            assert [e["id"] for e in sse_events(first)] == ["pending"]
            await wait_for(_is(lambda: waiters.held == 1), timeout_s=5, what="the stream waits")
            assert await held_as_scraped(api) == 1
        left_s = await wait_for(
            _is(lambda: waiters.held == 0), timeout_s=5, what="the waiter let go"
        )
        assert await held_as_scraped(api) == 0
    assert left_s < 2, f"the waiter stayed {left_s:.1f} s after its client left"


@pytest.mark.parametrize("query", ["", "?via=route"], ids=["dispatched", "routed"])
async def test_a_stream_past_the_bound_of_waiters_ends_at_once_when_the_process_stops(
    settings: Settings, query: str
) -> None:
    """Past its bound of waiters a stream holds no waiter: it reads its purchase, then pauses
    until the next heartbeat (15 s). The release a stop signal runs ends that pause too, so the
    stream ends then rather than at the server's graceful timeout (10 s)."""
    app = create_app(settings.model_copy(update={"status_max_waiters": 0}))
    async with served_api(settings, app) as api:
        purchase_id = await queued_purchase(api)
        async with api.stream("GET", f"/purchases/{purchase_id}/events{query}") as stream:
            chunks = stream.aiter_text()
            first = await anext(chunks)
            assert [e["id"] for e in sse_events(first)] == ["pending"]
            await asyncio.sleep(0.5)  # the stream pauses, with no waiter to wake it
            assert app.state.resources.waiters.held == 0

            app.state.resources.purchases.release_waiters()
            started = time.monotonic()
            rest = [chunk async for chunk in chunks]
            ended_s = time.monotonic() - started
    assert ended_s < 2, f"the stream ended {ended_s:.1f} s after the release"
    assert ": heartbeat" not in "".join(rest), "a stopping process sent a heartbeat"


async def held_as_scraped(api: httpx.AsyncClient) -> float:
    """What operators see: the held status requests gauge."""
    return sample((await api.get("/metrics")).text, "ticketing_status_waiters")


def _is(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check


async def test_a_stream_of_a_never_issued_id_is_404_problem_json(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get(f"/purchases/{uuid4()}/events"), 404)
    assert_problem(await api.get("/purchases/not-a-uuid/events"), 422)


async def test_the_stream_and_the_long_poll_answer_cors(
    settings: Settings, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    async with served_api(settings) as api:
        await answered_with_cors(api, db, start_worker)


async def answered_with_cors(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api)
    await start_worker()
    await wait_until_final(db, [purchase_id])
    origin = {"Origin": "https://shop.example"}
    polled = await api.get(f"/purchases/{purchase_id}", params={"wait": 5}, headers=origin)
    assert polled.headers["access-control-allow-origin"] in ("*", "https://shop.example")
    assert "etag" in polled.headers["access-control-expose-headers"].lower()
    async with api.stream("GET", f"/purchases/{purchase_id}/events", headers=origin) as stream:
        assert stream.headers["access-control-allow-origin"] in ("*", "https://shop.example")
        async for _ in stream.aiter_text():
            break  # the first event is enough; closing the stream early must be harmless


async def test_a_waiting_request_reads_its_purchase_when_woken_not_in_a_loop(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    purchase_id = await queued_purchase(api)
    reads = counting(repository, "get_purchase", monkeypatch)
    response, seconds = await long_poll(api, purchase_id, 3)
    assert response.json()["status"] == "pending"
    assert seconds >= 2.9
    # Once on arrival, once at the deadline (so that the wait ahead it answers is as of now).
    assert reads.count == 2, f"{reads.count} reads while waiting 3 s for a change that never came"


async def test_the_listener_is_one_connection_per_process(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    waiting = [
        asyncio.create_task(long_poll(api, await queued_purchase(api), 2)) for _ in range(20)
    ]
    await asyncio.sleep(0.5)
    listeners = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'ticketing-status-listener'"
    )
    assert listeners == 1
    await asyncio.gather(*waiting)


# --- the wait ahead ------------------------------------------------------------------------------


async def test_a_pending_purchase_knows_no_wait_before_its_partition_decided_anything(
    api: httpx.AsyncClient,
) -> None:
    purchase_id = await queued_purchase(api)
    body = (await api.get(f"/purchases/{purchase_id}")).json()
    assert body["status"] == "pending"
    assert body["queue"] is None


async def test_the_worker_records_its_partitions_horizon_in_the_commit_and_while_idle(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    event = await create_event(api)
    accepted = await purchase(api, event["id"])
    await start_worker()
    purchase_id = UUID(accepted.json()["purchase_id"])
    row = (await wait_until_final(db, [purchase_id]))[purchase_id]
    partition = partition_of(settings, event["id"])
    first = await db.fetchrow("SELECT * FROM partition_progress WHERE partition = $1", partition)
    assert first is not None
    assert first["horizon"] >= row["accepted_at"]

    async def moved_on() -> bool:  # idle, it records that everything until now is decided
        later = await db.fetchrow(
            "SELECT * FROM partition_progress WHERE partition = $1", partition
        )
        assert later is not None
        return bool(later["horizon"] > first["horizon"] and later["rate"] is not None)

    await wait_for(moved_on, timeout_s=10, what="the idle partition to record its progress")

    async def keeps_up() -> bool:  # about a second decided per second, once smoothed
        rate = await db.fetchval(
            "SELECT rate FROM partition_progress WHERE partition = $1", partition
        )
        return bool(0.8 < rate < 1.2)

    await wait_for(keeps_up, timeout_s=30, what="the idle partition's pace to settle near 1")


async def test_a_pending_purchase_carries_the_wait_ahead_of_it(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    event = await create_event(api)
    worker = await start_worker()
    first = await purchase(api, event["id"])
    await wait_until_final(db, [first.json()["purchase_id"]])
    await asyncio.sleep(1.5)  # idle: the horizon reaches about now
    worker.stop()
    await wait_for_no_consumers_of(settings)
    horizon = await db.fetchval(
        "SELECT horizon FROM partition_progress WHERE partition = $1",
        partition_of(settings, event["id"]),
    )
    await asyncio.sleep(1.0)

    accepted = await purchase(api, event["id"])
    body = (await api.get(f"/purchases/{accepted.json()['purchase_id']}")).json()

    assert body["status"] == "pending"
    queue = body["queue"]
    ahead = (datetime.fromisoformat(body["accepted_at"]) - horizon).total_seconds()
    assert queue["ahead_s"] == pytest.approx(ahead, abs=0.01)
    assert queue["ahead_s"] >= 1.0  # the second the worker has been stopped, at least
    assert queue["estimated_wait_s"] is not None
    assert queue["estimated_wait_s"] > 0


async def event_with_a_stopped_worker(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> dict[str, Any]:
    """An event whose partition has decided a purchase (its progress is recorded), and no
    worker any more: what is purchased next stays pending."""
    event = await create_event(api)
    worker = await start_worker()
    first = await purchase(api, event["id"])
    await wait_until_final(db, [first.json()["purchase_id"]])
    worker.stop()
    await wait_for_no_consumers_of(settings)
    return event


async def test_no_wait_is_promised_while_no_worker_decides_the_partition(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, start_worker: StartWorker
) -> None:
    """The last record of the partition's progress is older than a worker ever leaves it (it
    records at every commit and once a second while idle): nobody decides the partition now,
    so the wait ahead is known but its duration is not."""
    event = await event_with_a_stopped_worker(api, db, settings, start_worker)
    await db.execute(
        "UPDATE partition_progress SET recorded_at = now() - interval '10 seconds', "
        "horizon = horizon - interval '10 seconds' WHERE partition = $1",
        partition_of(settings, event["id"]),
    )

    accepted = await purchase(api, event["id"])
    body = (await api.get(f"/purchases/{accepted.json()['purchase_id']}")).json()

    assert body["status"] == "pending"
    assert body["queue"]["ahead_s"] >= 10
    assert body["queue"]["estimated_wait_s"] is None


async def test_another_replica_knows_nothing_of_the_wait_ahead(
    api: httpx.AsyncClient, settings: Settings, start_worker: StartWorker, db: asyncpg.Pool
) -> None:
    event = await event_with_a_stopped_worker(api, db, settings, start_worker)
    purchase_id = (await purchase(api, event["id"])).json()["purchase_id"]
    async with api_client(settings) as other:
        body = (await other.get(f"/purchases/{purchase_id}")).json()
    assert body["status"] == "pending"
    assert body["queue"] is None


async def wait_for_no_consumers_of(settings: Settings) -> None:
    connection = await broker_nodes.connect(settings)
    try:
        channel = await connection.channel()
        await wait_for_no_consumers(channel, settings)
    finally:
        await connection.close()


async def test_waiters_woken_by_one_commit_are_read_in_one_query_not_one_each(
    api: httpx.AsyncClient, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = await create_event(api, total_tickets=100)
    accepted = [await purchase(api, event["id"], customer_id=f"c-{i}") for i in range(50)]
    single = batched = 0
    real_one, real_many = repository.get_purchase, repository.get_purchases_in_full

    async def one(conn: Any, wanted: UUID) -> Any:
        nonlocal single
        single += 1
        return await real_one(conn, wanted)

    async def many(conn: Any, wanted: list[UUID]) -> Any:
        nonlocal batched
        batched += 1
        return await real_many(conn, wanted)

    monkeypatch.setattr(repository, "get_purchase", one)
    monkeypatch.setattr(repository, "get_purchases_in_full", many)
    waiting = [asyncio.create_task(long_poll(api, r.json()["purchase_id"], 25)) for r in accepted]
    await asyncio.sleep(1.0)
    assert single == 50  # each read once, before it waits
    await start_worker()

    answers = await asyncio.gather(*waiting)
    assert [r.json()["status"] for r, _ in answers] == ["confirmed"] * 50
    assert single == 50, "a woken waiter read its purchase by itself"
    assert 1 <= batched <= 5


async def test_a_reconnect_that_has_the_final_status_is_told_204_to_stop(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    purchase_id = await queued_purchase(api)
    await start_worker()
    await wait_until_final(db, [purchase_id])
    assert (await api.post(f"/purchases/{purchase_id}/cancel")).status_code == 202
    response, _ = await long_poll(api, purchase_id, 20, **{"If-None-Match": '"confirmed"'})
    assert response.json()["status"] == "cancelled"

    again = await api.get(
        f"/purchases/{purchase_id}/events", headers={"Last-Event-ID": "cancelled"}
    )
    assert again.status_code == 204
    assert again.content == b""


def test_the_openapi_document_declares_the_streams_204_and_its_last_event_id() -> None:
    """A client built from the document must know the header that makes the 204 and the 204
    itself, or it takes the answer that stops EventSource for an undeclared one."""
    stream = json.loads(render())["paths"]["/purchases/{purchase_id}/events"]["get"]

    assert "204" in stream["responses"]
    assert "Last-Event-ID" in [p["name"] for p in stream["parameters"] if p["in"] == "header"]


def test_a_purchase_read_for_many_waiters_never_moves_one_of_them_backwards() -> None:
    """The listener's read may have started before a waiter's own: what is older than what the
    waiter saw is read again, never answered."""
    from shared.purchases.models import PurchaseStatus
    from shared.purchases.service import _older

    held, confirmed = PurchaseStatus.HELD, PurchaseStatus.CONFIRMED
    assert _older(held, confirmed)
    assert not _older(confirmed, held)
    assert not _older(PurchaseStatus.CANCELLED, confirmed)
    assert not _older(PurchaseStatus.CONFIRMED, PurchaseStatus.FAILED)
    assert not _older(held, None)


async def test_a_stream_past_the_bound_of_waiters_never_says_pending_once_decided(
    settings: Settings, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    """Past its bound of waiters a stream learns of a change only by reading, once per
    heartbeat: the heartbeat of a pending purchase must come after that read, or it re-sends
    `pending` for a purchase decided during the pause."""
    app = create_app(
        settings.model_copy(update={"status_max_waiters": 0, "status_heartbeat_s": 4.0})
    )
    async with served_api(settings, app) as api:
        purchase_id = await queued_purchase(api)
        async with api.stream("GET", f"/purchases/{purchase_id}/events") as stream:
            chunks = stream.aiter_text()
            assert [e["id"] for e in sse_events(await anext(chunks))] == ["pending"]
            await asyncio.sleep(0.3)  # paused now, until its heartbeat
            await start_worker()
            await wait_until_final(db, [UUID(purchase_id)])  # within the pause
            # A confirmed purchase may still be cancelled: its stream goes on; read until then.
            text = ""
            async with asyncio.timeout(15):
                while "id: confirmed" not in text:
                    text += await anext(chunks)

    assert [e["id"] for e in sse_events(text)] == ["confirmed"], text
