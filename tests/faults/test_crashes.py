"""Processes dying on purpose: a worker SIGKILLed again and again, and an API sent SIGTERM in the
middle of a flood."""

import asyncio
import signal
from asyncio.subprocess import PIPE

import asyncpg
import httpx
import pytest

from shared.settings import Settings
from tests.conftest import StartWorker, api_client
from tests.factories import create_event, purchase
from tests.faults.helpers import (
    Flood,
    account,
    api_process,
    flood,
    killed_after_a_commit,
    report,
    worker_process,
)
from tests.metrics import free_port, sample, scrape

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def test_a_worker_killed_mid_batch_again_and_again_loses_and_doubles_nothing(
    settings: Settings, db: asyncpg.Pool
) -> None:
    """SIGKILL a worker five times while it works through a backlog, each time right after it
    committed a batch: it dies holding delivered, unacked messages, which the next incarnation
    gets again (redelivered), and every purchase is applied exactly once."""
    # Small batches (and so a small prefetch): a backlog takes many commits, so a kill after
    # the first one finds messages delivered and not yet acked.
    crashing = settings.model_copy(update={"batch_size": 10})
    async with api_client(settings) as client:
        event = await create_event(client, total_tickets=2_000)
        backlog = await flood(client, event["id"], count=300, concurrency=8, prefix="backlog")
        assert len(backlog.accepted) == 300
        flooding = asyncio.create_task(
            flood(client, event["id"], count=600, concurrency=8, pause_s=0.005)
        )
        redelivered = duplicates = 0
        for kill in range(5):
            # Each incarnation starts with work queued, however fast the previous ones were.
            topped = await flood(client, event["id"], count=100, concurrency=8, prefix=f"k{kill}")
            assert len(topped.accepted) == 100
            backlog.accepted.update(topped.accepted)
            # The same WORKER_ID each time: a restart after a crash waits out its dead
            # incarnation's heartbeat, then takes its own leases back (a new epoch).
            text = await killed_after_a_commit(crashing, "crashing-worker")
            redelivered += int(sample(text, "ticketing_worker_redeliveries_total"))
            duplicates += int(sample(text, "ticketing_worker_duplicate_purchases_total"))
            print(f"kill {kill + 1}: {await decided(db, event['id'])} purchases decided so far")
        result = await flooding
        result.accepted.update(backlog.accepted)
        port = free_port()
        async with worker_process(settings, "crashing-worker", port):
            counts = await account(db, event["id"], result.accepted)
            text = scrape(port)
        redelivered += int(sample(text, "ticketing_worker_redeliveries_total"))
        duplicates += int(sample(text, "ticketing_worker_duplicate_purchases_total"))
    report("crash loop (5 SIGKILLs mid-batch)", result, counts)
    print(
        f"redelivered messages: {redelivered}, purchases skipped as already decided: {duplicates}"
    )
    assert redelivered > 0, "no kill left a delivered message unacked: redelivery never ran"
    assert counts["lost"] == 0
    assert counts["confirmed"] == counts["accepted"]  # enough tickets for all: none failed
    assert counts["doubled"] == 0
    assert counts["rows"] == counts["accepted"]
    sold = await db.fetchval(
        "SELECT total_tickets - available_tickets FROM events WHERE id = $1::uuid", event["id"]
    )
    assert sold == counts["accepted"]  # one ticket each, and enough tickets for all


async def decided(db: asyncpg.Pool, event_id: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM purchases WHERE event_id = $1::uuid", event_id
    )
    return count


async def log_of(proc: asyncio.subprocess.Process) -> str:
    """What an exited process wrote to its piped stderr."""
    assert proc.stderr is not None
    return (await proc.stderr.read()).decode()


async def stream_lines(client: httpx.AsyncClient, purchase_id: str) -> list[str]:
    """The non-empty lines of a purchase's status event stream, until it ends."""
    async with client.stream("GET", f"/purchases/{purchase_id}/events") as response:
        return [line async for line in response.aiter_lines() if line]


async def test_api_sigterm_mid_flood_answers_in_flight_requests_then_exits(
    settings: Settings, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    async with api_process(settings, timeout_s=10) as (proc, client):
        event = await create_event(client, total_tickets=100_000)
        progress = Flood()
        # Far more than can be sent before the signal: the flood ends when the API does.
        flooding = asyncio.create_task(
            flood(
                client,
                event["id"],
                count=100_000,
                concurrency=16,
                into=progress,
                stop_on_error=True,
            )
        )
        # Signal once the flood is under way, however slow the machine is today.
        while len(progress.accepted) < 200 and not flooding.done():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(proc.wait(), 20)
        result = await flooding
    await start_worker()
    counts = await account(db, event["id"], result.accepted)
    report("API SIGTERM", result, counts)
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete, as a supervisor expects.
    assert exit_code in (0, -signal.SIGTERM)
    assert len(result.accepted) >= 200, "the signal came before the flood was under way"
    assert result.errors > 0, "the flood never saw the API go away"
    # In-flight requests were answered: accepted, or refused in a way a client can retry.
    assert set(result.statuses) <= {202, 503}, result.statuses
    assert counts["lost"] == 0
    assert counts["confirmed"] == counts["accepted"]  # tickets for all: none failed
    assert counts["doubled"] == 0
    # Every purchase that reached the queue was answered 202: nothing applied unannounced.
    assert counts["rows"] == counts["accepted"]


async def test_api_sigterm_answers_held_long_polls_and_ends_event_streams_at_once(
    settings: Settings,
) -> None:
    """A stop must not wait out the graceful timeout (10 s) on requests held for up to 30 s,
    then cut them: on SIGTERM each held long-poll answers with the status as it stands, each
    event stream ends, and the process exits, with no error logged for any of them."""
    async with api_process(settings, stderr=PIPE, timeout_s=30) as (proc, client):
        event = await create_event(client)
        ids = [
            (await purchase(client, event["id"], customer_id=f"c-{i}")).json()["purchase_id"]
            for i in range(21)
        ]  # no worker: every one stays pending

        async def long_poll(purchase_id: str) -> httpx.Response:
            return await client.get(f"/purchases/{purchase_id}?wait=30")

        polls = [asyncio.create_task(long_poll(p)) for p in ids[:20]]
        streaming = asyncio.create_task(stream_lines(client, ids[20]))
        await asyncio.sleep(1.0)  # every request is held
        assert not any(task.done() for task in (*polls, streaming))

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):  # far below the 10 s graceful timeout
            answers = await asyncio.gather(*polls)
            events = await streaming
            exit_code = await proc.wait()
    log = await log_of(proc)

    assert [answer.status_code for answer in answers] == [200] * 20
    assert {answer.headers["etag"] for answer in answers} == {'"pending"'}
    assert {answer.json()["status"] for answer in answers} == {"pending"}
    assert events[:2] == ["id: pending", "event: status"], events
    assert exit_code in (0, -signal.SIGTERM)
    assert "Exception in ASGI application" not in log
    assert "timeout graceful shutdown exceeded" not in log


@pytest.mark.parametrize("settings", [{"status_max_waiters": 0}], indirect=True)
async def test_api_sigterm_ends_event_streams_past_the_bound_of_waiters_at_once(
    settings: Settings,
) -> None:
    """Past its bound of waiters the process holds no status request: a long-poll is answered
    at once, and a stream reads its purchase once per heartbeat (15 s) with no waiter to wake
    it. On SIGTERM that stream still ends at once, rather than being cut at the graceful
    timeout (10 s) with an error."""
    async with api_process(settings, stderr=PIPE, timeout_s=30) as (proc, client):
        event = await create_event(client)
        purchase_id = (await purchase(client, event["id"])).json()["purchase_id"]

        streaming = asyncio.create_task(stream_lines(client, purchase_id))
        async with asyncio.timeout(2):  # not held: the process has no waiter to give it
            polled = await client.get(f"/purchases/{purchase_id}?wait=30")
        await asyncio.sleep(1.0)  # the stream pauses until its next heartbeat
        assert not streaming.done()

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):  # far below the 10 s graceful timeout
            events = await streaming
            exit_code = await proc.wait()
    log = await log_of(proc)

    assert polled.json()["status"] == "pending"
    assert events[:2] == ["id: pending", "event: status"], events
    assert ": heartbeat" not in events
    assert exit_code in (0, -signal.SIGTERM)
    assert "Exception in ASGI application" not in log
    assert "timeout graceful shutdown exceeded" not in log
