"""Processes dying on purpose: a worker SIGKILLed again and again, and an API sent SIGTERM in the
middle of a flood."""

import asyncio
import contextlib
import os
import signal
import socket
import sys

import asyncpg
import httpx
import pytest

from shared.settings import Settings
from tests.conftest import StartWorker, api_client, settings_env
from tests.factories import create_event
from tests.faults.helpers import account, flood, report, worker_process

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def test_worker_killed_repeatedly_mid_flood_loses_and_doubles_nothing(
    settings: Settings, db: asyncpg.Pool
) -> None:
    async with api_client(settings) as client:
        event = await create_event(client, total_tickets=600)
        flooding = asyncio.create_task(
            flood(client, event["id"], count=900, concurrency=8, pause_s=0.005)
        )
        kills = 0
        for _ in range(5):
            # The same WORKER_ID each time: a restarted worker takes its own leases back at once
            # (new epoch), so the loop exercises redelivery rather than lease expiry.
            async with worker_process(settings, "crashing-worker") as proc:
                await asyncio.sleep(0.8)
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
                kills += 1
        result = await flooding
        async with worker_process(settings, "crashing-worker"):
            counts = await account(db, event["id"], result.accepted)
    report(f"crash loop ({kills} SIGKILLs)", result, counts)
    assert counts["lost"] == 0
    assert counts["doubled"] == 0
    assert counts["rows"] == counts["accepted"]
    sold = await db.fetchval(
        "SELECT total_tickets - available_tickets FROM events WHERE id = $1::uuid", event["id"]
    )
    assert sold == min(600, counts["accepted"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_api_sigterm_mid_flood_answers_in_flight_requests_then_exits(
    settings: Settings, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    port = free_port()
    env = settings_env(settings)
    env.update({"API_PORT": str(port), "LOG_FORMAT": "text"})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "api", env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for _ in range(100):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            event = await create_event(client, total_tickets=100_000)
            flooding = asyncio.create_task(flood(client, event["id"], count=2_000, concurrency=16))
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            exit_code = await asyncio.wait_for(proc.wait(), 20)
            result = await flooding
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await start_worker()
    counts = await account(db, event["id"], result.accepted)
    report("API SIGTERM", result, counts)
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete, as a supervisor expects.
    assert exit_code in (0, -signal.SIGTERM)
    assert result.accepted, "nothing was accepted before the shutdown"
    assert result.errors > 0 or result.sent < 2_000, "the flood outlived the API"
    assert counts["lost"] == 0
    assert counts["doubled"] == 0
    # Every purchase that reached the queue was answered 202: nothing applied unannounced.
    assert counts["rows"] == counts["accepted"]
