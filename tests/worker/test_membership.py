"""Worker membership: heartbeats decide who is live, and one live process per WORKER_ID."""

import signal
import time
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import pytest

from shared.settings import Settings
from tests.worker.helpers import wait_for, wait_started, worker_processes
from worker import membership
from worker.membership import WorkerIdInUse


async def incarnation(db: asyncpg.Pool, worker_id: str) -> UUID | None:
    found: UUID | None = await db.fetchval(
        "SELECT incarnation FROM workers WHERE worker_id = $1", worker_id
    )
    return found


async def test_heartbeats_decide_who_is_live(db: asyncpg.Pool) -> None:
    a, b, c = uuid4(), uuid4(), uuid4()
    async with db.acquire() as conn:
        await membership.join(conn, "a", a, 30, wait_s=0)
        await membership.join(conn, "b", b, 30, wait_s=0)
        await membership.join(conn, "c", c, 30, wait_s=0)
        await conn.execute(
            "UPDATE workers SET expires_at = now() - interval '1 second' WHERE worker_id = 'b'"
        )
        assert await membership.live_workers(conn) == ["a", "c"]
        assert await membership.heartbeat(conn, "b", b, 30)  # back from a pause: still its id
        await membership.leave(conn, "c", c)
        assert await membership.live_workers(conn) == ["a", "b"]


async def test_a_second_process_with_a_live_worker_id_is_refused(db: asyncpg.Pool) -> None:
    first, second = uuid4(), uuid4()
    async with db.acquire() as conn:
        await membership.join(conn, "twin", first, 30, wait_s=0)
        started = time.monotonic()
        with pytest.raises(WorkerIdInUse, match="'twin' is already used by a live worker"):
            await membership.join(conn, "twin", second, 30, wait_s=0.5)
        assert time.monotonic() - started >= 0.5  # it gave the holder a chance to expire
        # The refused one changed nothing: the first still heartbeats and leaves as itself.
        assert await membership.heartbeat(conn, "twin", first, 30)
        assert not await membership.heartbeat(conn, "twin", second, 30)


async def test_a_restart_after_a_crash_waits_out_its_dead_predecessor(db: asyncpg.Pool) -> None:
    crashed, restarted = uuid4(), uuid4()
    async with db.acquire() as conn:
        await membership.join(conn, "phoenix", crashed, 1.0, wait_s=0)
        started = time.monotonic()
        await membership.join(conn, "phoenix", restarted, 1.0, wait_s=3)
        waited = time.monotonic() - started
        assert 0.5 < waited < 3
        # The dead incarnation, were it only frozen, finds its id taken when it wakes.
        assert not await membership.heartbeat(conn, "phoenix", crashed, 1.0)
        assert await membership.heartbeat(conn, "phoenix", restarted, 1.0)


async def test_leaving_removes_only_this_incarnations_row(db: asyncpg.Pool) -> None:
    mine, other = uuid4(), uuid4()
    async with db.acquire() as conn:
        await membership.join(conn, "w", mine, 30, wait_s=0)
        await membership.leave(conn, "w", other)
        assert await membership.live_workers(conn) == ["w"]
        await membership.leave(conn, "w", mine)
        assert await membership.live_workers(conn) == []


@pytest.mark.slow
async def test_a_worker_process_started_with_a_live_worker_id_exits_with_one_clear_line(
    settings: Settings, db: asyncpg.Pool, tmp_path: Path
) -> None:
    async with worker_processes(settings, tmp_path) as spawn:
        first = await spawn("same-id")
        await wait_started(db, [first])
        second = await spawn("same-id")
        code = await second.wait(30)
        assert first.running, "the first worker must keep running"
    assert code != 0
    lines = [line for line in second.log().splitlines() if "WORKER_ID" in line]
    assert lines, second.log()
    assert "'same-id' is already used by a live worker" in lines[-1]
    assert "Traceback" not in second.log()
    # The line a worker that ran logs when it stops: an operator reading both logs would take
    # the refused process for the live one going away.
    assert "stopped after" not in second.log()


@pytest.mark.slow
async def test_a_worker_frozen_while_its_id_was_taken_over_stops_when_it_wakes(
    settings: Settings, db: asyncpg.Pool, tmp_path: Path
) -> None:
    """A process frozen past its lifetime (SIGSTOP, a VM pause) whose WORKER_ID a new process
    took meanwhile must not come back and fight it: it stops, exit non-zero, one clear line."""
    async with worker_processes(settings, tmp_path) as spawn:
        frozen = await spawn("reused-id")
        await wait_started(db, [frozen])
        frozen.send(signal.SIGSTOP)
        first = await incarnation(db, "reused-id")
        successor = await spawn("reused-id")

        async def taken_over() -> bool:
            return await incarnation(db, "reused-id") not in (None, first)

        await wait_for(taken_over, timeout_s=30, what="the successor to take the id over")
        frozen.send(signal.SIGCONT)
        code = await frozen.wait(30)
        assert successor.running
    assert code != 0
    assert "was taken over by another process" in frozen.log()
    assert "Traceback" not in frozen.log()
