"""The straightforward design the benchmark compares against: one HTTP request = one
transaction (lock the event, version-checked update, insert the purchase), answered 201 or 409.

    uvicorn bench.baseline_app:app    (DATABASE_URL as for the real services)
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from uuid import UUID, uuid4

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shared.purchases.models import PurchaseCreate
from shared.settings import get_settings

LOCK_EVENT = "SELECT available_tickets, version FROM events WHERE id = $1 FOR UPDATE"
TAKE_TICKETS = """
    UPDATE events SET available_tickets = available_tickets - $2, version = version + 1
    WHERE id = $1 AND version = $3
"""
INSERT_PURCHASE = """
    INSERT INTO purchases (id, event_id, customer_id, quantity, status, accepted_at)
    VALUES ($1, $2, $3, $4, 'confirmed', $5)
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(
        get_settings().database_url, min_size=20, max_size=20
    )
    yield
    await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


@app.post("/events/{event_id}/tickets/purchase")
async def purchase(event_id: UUID, body: PurchaseCreate, request: Request) -> JSONResponse:
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(LOCK_EVENT, event_id)
        if row is None:
            return JSONResponse({"detail": "no such event"}, status_code=404)
        if row["available_tickets"] < body.quantity:
            return JSONResponse({"detail": "sold out"}, status_code=409)
        if await conn.execute(TAKE_TICKETS, event_id, body.quantity, row["version"]) != "UPDATE 1":
            return JSONResponse({"detail": "conflict"}, status_code=409)
        purchase_id = uuid4()
        await conn.execute(
            INSERT_PURCHASE,
            purchase_id,
            event_id,
            body.customer_id,
            body.quantity,
            datetime.now(UTC),
        )
    return JSONResponse({"purchase_id": str(purchase_id), "status": "confirmed"}, status_code=201)
