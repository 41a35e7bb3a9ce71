"""A full partition queue refuses publishes: the API answers 503, and what it refused is never
applied, while everything it accepted is."""

from uuid import UUID

import asyncpg
import httpx
import pytest

from shared.purchases.ids import PurchaseIds
from shared.settings import Settings
from tests.conftest import StartWorker
from tests.factories import create_event
from tests.faults.helpers import account, flood, report

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("settings", [{"queue_max_length": 3}], indirect=True)
async def test_full_queue_answers_503_and_refused_purchases_are_never_applied(
    settings: Settings, api: httpx.AsyncClient, db: asyncpg.Pool, start_worker: StartWorker
) -> None:
    event = await create_event(api, total_tickets=10_000)
    # No worker yet: the event's partition queue fills up after three messages.
    result = await flood(api, event["id"], count=120, concurrency=12)
    assert result.statuses[503] > 0, "the queue never filled up"
    assert result.accepted, "nothing was accepted before the queue filled"

    await start_worker()
    counts = await account(db, event["id"], result.accepted)
    report("backpressure", result, counts)
    assert counts["lost"] == 0
    assert counts["confirmed"] == counts["accepted"]  # tickets for all: none failed
    assert counts["doubled"] == 0

    # The test knows the secret, so it can name the ids the refused requests would have had.
    ids = PurchaseIds(settings.purchase_id_secret)
    refused = [
        ids.for_idempotency_key(event_id=UUID(event["id"]), customer_id=f"customer-{key}", key=key)
        for key in result.refused_keys
    ]
    applied_refused = await db.fetchval(
        "SELECT count(*) FROM purchases WHERE id = ANY($1::uuid[])", refused
    )
    print(f"[backpressure] refused={len(refused)} applied_of_refused={applied_refused}")
    assert applied_refused == 0
    assert counts["rows"] == counts["accepted"]
