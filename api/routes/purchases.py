"""Purchases: accept one (202, queued) and report its status."""

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Header, Response, status

from api.deps import PurchaseServiceDep
from api.problems import problem_responses
from shared.purchases.models import Purchase, PurchaseAccepted, PurchaseCreate, PurchaseStatus
from shared.text import IdempotencyKey

router = APIRouter(tags=["purchases"])

RETRY_AFTER_PENDING_S = "1"
# Served by these routes and, for unremarkable requests, by api/fast_paths.py.
PURCHASE_PATH = "/events/{event_id}/tickets/purchase"
STATUS_PATH = "/purchases/{purchase_id}"


@router.post(
    PURCHASE_PATH,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PurchaseAccepted,
    responses=problem_responses(400, 404, 409, 413, 415, 422, 503),
)
async def purchase_tickets(
    event_id: UUID,
    body: PurchaseCreate,
    purchases: PurchaseServiceDep,
    idempotency_key: Annotated[
        IdempotencyKey | None,
        Header(
            alias="Idempotency-Key",
            description="Retrying with the same key (same customer, same event) returns the same "
            "purchase_id and never buys twice. Reusing it for another quantity is a 422.",
        ),
    ] = None,
) -> Response:
    """Queue a purchase. The 202 is sent only once RabbitMQ has confirmed the persistent message;
    poll `status_url` for the outcome."""
    accepted = await purchases.submit(event_id, body, idempotency_key=idempotency_key)
    # Serialized here, once: returning the model would have FastAPI validate it again first.
    return Response(
        accepted.model_dump_json(),
        status_code=status.HTTP_202_ACCEPTED,
        media_type="application/json",
        headers={"Location": accepted.status_url, "Retry-After": RETRY_AFTER_PENDING_S},
    )


@router.get(
    STATUS_PATH,
    response_model=Purchase,
    responses=problem_responses(404, 422, 503),
)
async def get_purchase(
    purchase_id: UUID, purchases: PurchaseServiceDep, response: Response
) -> Purchase:
    purchase = await purchases.status(purchase_id)
    if purchase.status == PurchaseStatus.PENDING:
        response.headers["Retry-After"] = RETRY_AFTER_PENDING_S
    return purchase
