"""The ceiling for the API's accept path: validate a purchase and answer 202, nothing else
(no event lookup, no broker). The benchmark reports the real endpoint as a ratio of this.

    uvicorn bench.bare_app:app
"""

from uuid import UUID, uuid4

from fastapi import FastAPI, Response, status

from shared.purchases.models import PurchaseAccepted, PurchaseCreate

app = FastAPI()


@app.post(
    "/events/{event_id}/tickets/purchase",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PurchaseAccepted,
)
async def purchase(event_id: UUID, body: PurchaseCreate, response: Response) -> PurchaseAccepted:
    purchase_id = uuid4()
    response.headers["Location"] = f"/purchases/{purchase_id}"
    response.headers["Retry-After"] = "1"
    return PurchaseAccepted(
        purchase_id=purchase_id,
        event_id=event_id,
        customer_id=body.customer_id,
        quantity=body.quantity,
        status_url=f"/purchases/{purchase_id}",
    )
