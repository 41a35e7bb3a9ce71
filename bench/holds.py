"""The flash sale with holds: buyers who get a hold pay for it, except a random third who never
do. Their holds expire and the tickets go back on sale to later buyers, until every ticket is
confirmed. Buyers behave as the frontend does: purchase, poll the status URL, confirm (or walk
away), and try again when the event is sold out for now (409) or the broker is busy (503).
"""

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

POLL_S = 0.2  # how often a buyer's browser polls its status URL
RETRY_S = 0.25  # how long a buyer waits before trying again after a 409 or a 503


@dataclass
class Crowd:
    requests: Counter[str] = field(default_factory=Counter)  # "purchase 202", "confirm 409", ...
    holds_seen: int = 0
    abandoned: int = 0
    sold_out_after_s: float | None = None


async def sell_out_with_holds(
    base_url: str,
    db: asyncpg.Pool,
    event_id: uuid.UUID,
    *,
    tickets: int,
    buyers: int,
    unpaid_share: float = 1 / 3,
    timeout_s: float = 300.0,
    seed: int = 12,
) -> dict[str, Any]:
    crowd = Crowd()
    sold_out = asyncio.Event()
    rnd = random.Random(seed)
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=buyers, max_keepalive_connections=buyers)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def status_of(purchase_id: str) -> str:
            while True:
                response = await client.get(f"/purchases/{purchase_id}")
                crowd.requests[f"status {response.status_code}"] += 1
                status: str = response.json()["status"] if response.status_code == 200 else ""
                if status not in ("", "pending"):
                    return status
                await asyncio.sleep(POLL_S)

        async def buyer(number: int) -> None:
            attempt = 0
            while not sold_out.is_set():
                attempt += 1
                response = await client.post(
                    f"/events/{event_id}/tickets/purchase",
                    json={"customer_id": f"buyer-{number}-{attempt}", "quantity": 1},
                )
                crowd.requests[f"purchase {response.status_code}"] += 1
                if response.status_code != 202:
                    await asyncio.sleep(RETRY_S)
                    continue
                purchase_id = response.json()["purchase_id"]
                if await status_of(purchase_id) != "held":
                    await asyncio.sleep(RETRY_S)
                    continue
                crowd.holds_seen += 1
                if rnd.random() < unpaid_share:
                    crowd.abandoned += 1  # walks away: the hold expires
                    continue
                paid = await client.post(
                    f"/purchases/{purchase_id}/confirm",
                    json={"payment_reference": f"psp-{purchase_id}"},
                )
                crowd.requests[f"confirm {paid.status_code}"] += 1

        async def watch() -> None:
            while True:
                confirmed = await db.fetchval(
                    "SELECT coalesce(sum(quantity), 0) FROM purchases "
                    "WHERE event_id = $1 AND status = 'confirmed'",
                    event_id,
                )
                if confirmed >= tickets:
                    crowd.sold_out_after_s = time.perf_counter() - started
                    sold_out.set()
                    return
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        crowd_task = asyncio.gather(*(buyer(n) for n in range(buyers)))
        try:
            await asyncio.wait_for(asyncio.shield(watcher), timeout_s)
        finally:
            sold_out.set()
            watcher.cancel()
        await crowd_task
    return {
        "tickets": tickets,
        "buyers": buyers,
        "seconds_to_sell_out": crowd.sold_out_after_s,
        "holds_seen_by_buyers": crowd.holds_seen,
        "holds_abandoned": crowd.abandoned,
        "requests": dict(crowd.requests),
    }
