"""The whole path once: create an event, buy, see the purchase go pending -> confirmed."""

import asyncpg
import httpx

from tests.conftest import StartWorker
from tests.factories import assert_no_oversell, create_event, purchase, wait_until_final


async def test_purchase_goes_pending_then_confirmed(
    api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=3)
    accepted = await purchase(api, event["id"], quantity=2)
    assert accepted.status_code == 202
    purchase_id = accepted.json()["purchase_id"]

    await start_worker()
    rows = await wait_until_final(db, [purchase_id])
    assert rows[next(iter(rows))]["status"] == "confirmed"

    status = await api.get(f"/purchases/{purchase_id}")
    assert status.json()["status"] == "confirmed"
    assert "Retry-After" not in status.headers
    refreshed = await api.get(f"/events/{event['id']}")
    assert refreshed.json()["available_tickets"] == 1
    await assert_no_oversell(db)
