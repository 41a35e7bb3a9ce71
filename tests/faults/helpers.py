"""Flood helpers and the accounting every fault test prints: sent, accepted, finished, lost,
doubled."""

import asyncio
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg
import httpx

from shared.settings import Settings
from tests.conftest import settings_env
from tests.factories import FINAL
from tests.metrics import free_port, sample, scrape


@dataclass
class Flood:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: dict[str, UUID] = field(default_factory=dict)  # Idempotency-Key -> purchase id
    refused_keys: list[str] = field(default_factory=list)  # answered 503 (or no answer)
    errors: int = 0


async def buy_one(client: httpx.AsyncClient, event_id: str, key: str) -> httpx.Response:
    """One ticket for the customer named after `key`, with `key` as its Idempotency-Key."""
    return await client.post(
        f"/events/{event_id}/tickets/purchase",
        json={"customer_id": f"customer-{key}", "quantity": 1},
        headers={"Idempotency-Key": key},
    )


async def flood(
    client: httpx.AsyncClient,
    event_id: str,
    *,
    count: int,
    concurrency: int = 16,
    prefix: str = "k",
    pause_s: float = 0.0,
    into: Flood | None = None,
    stop_on_error: bool = False,
) -> Flood:
    """Send `count` purchases of one ticket, each with its own Idempotency-Key. Progress shows in
    `into` while it runs; with `stop_on_error`, the flood ends once the API stops answering."""
    result = into if into is not None else Flood()
    keys = iter(f"{prefix}-{i}" for i in range(count))
    stopped = False

    async def sender() -> None:
        nonlocal stopped
        for key in keys:
            if stopped:
                return
            result.sent += 1
            try:
                response = await buy_one(client, event_id, key)
            except httpx.HTTPError:
                result.errors += 1
                result.refused_keys.append(key)
                stopped = stop_on_error
                continue
            result.statuses[response.status_code] += 1
            if response.status_code == 202:
                result.accepted[key] = UUID(response.json()["purchase_id"])
            elif response.status_code == 503:
                assert response.headers["content-type"] == "application/problem+json"
                assert "Retry-After" in response.headers
                result.refused_keys.append(key)
            else:
                assert response.status_code == 409, response.text
            if pause_s:
                await asyncio.sleep(pause_s)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return result


async def retry_refused(client: httpx.AsyncClient, event_id: str, result: Flood) -> None:
    """What a well-behaved client does after a 503: retry with the same Idempotency-Key."""
    for key in list(result.refused_keys):
        for _ in range(100):
            try:
                response = await buy_one(client, event_id, key)
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
                continue
            if response.status_code == 202:
                result.accepted[key] = UUID(response.json()["purchase_id"])
                break
            if response.status_code == 409:
                break
            await asyncio.sleep(0.2)
    result.refused_keys.clear()


async def account(
    db: asyncpg.Pool, event_id: str, accepted: dict[str, UUID], *, timeout_s: float = 90.0
) -> dict[str, int]:
    """Wait until every accepted purchase is final (or the deadline), then count.
    lost = accepted but never final; confirmed = accepted and confirmed (failed is final, but
    not what an outage should leave); doubled = tickets taken beyond the confirmed rows."""
    ids = list(set(accepted.values()))
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        finished = await db.fetchval(
            "SELECT count(*) FROM purchases WHERE id = ANY($1::uuid[]) AND status = ANY($2)",
            ids,
            list(FINAL),
        )
        if finished == len(ids) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    confirmed = await db.fetchval(
        "SELECT count(*) FROM purchases WHERE id = ANY($1::uuid[]) AND status = 'confirmed'", ids
    )
    row = await db.fetchrow(
        """
        SELECT e.total_tickets - e.available_tickets AS taken,
               coalesce((SELECT sum(quantity) FROM purchases
                         WHERE event_id = e.id AND status = 'confirmed'), 0) AS confirmed,
               (SELECT count(*) FROM purchases WHERE event_id = e.id) AS rows
        FROM events e WHERE e.id = $1
        """,
        UUID(event_id),
    )
    assert row is not None, "the event is gone"
    return {
        "accepted": len(ids),
        "finished": int(finished),
        "lost": len(ids) - int(finished),
        "confirmed": int(confirmed),
        "doubled": int(row["taken"]) - int(row["confirmed"]),
        "rows": int(row["rows"]),
    }


def report(name: str, result: Flood, counts: dict[str, int]) -> None:
    print(
        f"\n[{name}] sent={result.sent} statuses={dict(result.statuses)} "
        f"client_errors={result.errors} accepted={counts['accepted']} "
        f"finished={counts['finished']} lost={counts['lost']} doubled={counts['doubled']} "
        f"purchase_rows={counts['rows']}"
    )


@contextlib.asynccontextmanager
async def worker_process(
    settings: Settings, worker_id: str, metrics_port: int = 0
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = settings_env(settings)
    env.update(
        {"WORKER_ID": worker_id, "WORKER_METRICS_PORT": str(metrics_port), "LOG_FORMAT": "text"}
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


# How long a worker process just started may take to commit its first batch: it starts, takes
# its lease (its killed predecessor's expires first) and becomes its queue's active consumer.
# About 5 s here; once, on this machine loaded by more than the test run, over 30.
COMMIT_WAIT_S = 60.0


async def wait_committing(proc: asyncio.subprocess.Process, port: int) -> None:
    """Until the worker process has committed a batch (fails if it exits). The batch may hold
    only redelivered purchases, all skipped: that is a commit too."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COMMIT_WAIT_S
    while loop.time() < deadline:
        assert proc.returncode is None, f"the worker exited with {proc.returncode}"
        with contextlib.suppress(OSError):
            if sample(scrape(port), "ticketing_worker_commit_seconds_count") >= 1:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the worker committed nothing within {COMMIT_WAIT_S:.0f} s")


async def killed_after_a_commit(settings: Settings, worker_id: str) -> str:
    """Run a worker process until it has committed a batch, then SIGKILL it (what it holds
    unacked goes back to the queue); its metrics as scraped just before the kill."""
    port = free_port()
    async with worker_process(settings, worker_id, port) as proc:
        await wait_committing(proc, port)
        text = scrape(port)
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    return text


@contextlib.asynccontextmanager
async def api_process(
    settings: Settings, *, timeout_s: float, stderr: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, httpx.AsyncClient]]:
    """`python -m api`, as deployed (its own uvicorn settings), on a free port, once ready, and
    a client of it; the process is killed on the way out if it is still up."""
    port = free_port()
    env = settings_env(settings)
    env.update({"API_PORT": str(port), "LOG_FORMAT": "text"})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "api", env=env, stderr=stderr)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=timeout_s
        ) as client:
            await until_ready(client)
            yield proc, client
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def until_ready(client: httpx.AsyncClient) -> None:
    for _ in range(100):
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the API process was not ready within 10 s")
