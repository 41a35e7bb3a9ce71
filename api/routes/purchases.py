"""Purchases: accept one (202, queued) and report its status.

Each route is the FastAPI face of a function of api/purchase_contract.py, which owns the whole
answer; the raw-ASGI dispatch (api/fast_paths.py) calls the same functions. The routes stay what
documents the contract (OpenAPI), described from the types the contract validates with.
"""

from uuid import UUID

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse

from api import purchase_contract
from api.deps import PurchaseServiceDep, SettingsDep, StatusWaitersDep
from api.problems import problem_responses
from api.response_headers import with_headers
from shared.purchases.models import LifecycleAccepted, Purchase, PurchaseAccepted

router = APIRouter(tags=["purchases"])


@router.post(
    purchase_contract.PURCHASE_PATH,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PurchaseAccepted,
    responses={
        **with_headers(202, "Location", "Retry-After"),
        **problem_responses(400, 404, 409, 413, 415, 422, 503),
    },
    openapi_extra=purchase_contract.ACCEPT_OPENAPI,
)
async def purchase_tickets(
    event_id: UUID, request: Request, purchases: PurchaseServiceDep
) -> Response:
    """Queue a purchase. The 202 is sent only once RabbitMQ has confirmed the persistent message;
    poll `status_url` for the outcome."""
    body = await request.body()
    answer = await purchase_contract.accept(purchases, request.scope, event_id, body)
    return answer.response()


@router.get(
    purchase_contract.STATUS_PATH,
    response_model=Purchase,
    responses={
        **with_headers(200, "ETag", "Cache-Control", "Retry-After"),
        **problem_responses(404, 422, 503),
    },
    openapi_extra=purchase_contract.STATUS_OPENAPI,
)
async def get_purchase(
    purchase_id: UUID, request: Request, purchases: PurchaseServiceDep
) -> Response:
    """The purchase's state, with `ETag: "<status>"`. While pending, `Retry-After` says when to
    ask again; `?wait=S` holds the answer until the status changes instead (long-poll)."""
    answer = await purchase_contract.status(purchases, request.scope, purchase_id)
    return answer.response()


@router.get(
    purchase_contract.STATUS_EVENTS_PATH,
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`event: status` with the purchase as JSON, first and on every "
            "change (`id:` is the status); a comment as heartbeat. The stream ends after a "
            "status that can no longer change, or after a few minutes (reconnect with "
            "`Last-Event-ID`).",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        204: {
            "description": "No stream: the status named by `Last-Event-ID` can no longer "
            "change, so no event will follow (EventSource stops reconnecting)."
        },
        **problem_responses(404, 422, 503),
    },
    openapi_extra=purchase_contract.STATUS_EVENTS_OPENAPI,
)
async def purchase_events(
    purchase_id: UUID,
    request: Request,
    purchases: PurchaseServiceDep,
    waiters: StatusWaitersDep,
    settings: SettingsDep,
) -> Response:
    """Follow the purchase's status as server-sent events (204 when the client already has its
    final status: EventSource then stops reconnecting)."""
    answer = await purchase_contract.status_events(
        purchases,
        waiters,
        request.scope,
        purchase_id,
        heartbeat_s=settings.status_heartbeat_s,
        max_s=settings.status_stream_max_s,
    )
    return answer.response()


@router.post(
    purchase_contract.CONFIRM_PATH,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=LifecycleAccepted,
    responses={
        **with_headers(202, "Location", "Retry-After"),
        **problem_responses(400, 404, 409, 413, 415, 422, 503),
    },
    openapi_extra=purchase_contract.CONFIRM_OPENAPI,
)
async def confirm_purchase(
    purchase_id: UUID, request: Request, purchases: PurchaseServiceDep
) -> Response:
    """Confirm a held purchase with its payment reference. The worker confirms it if this was
    accepted before the hold's end (`hold_expires_at`); after it, the purchase expires. 409 if
    the purchase is rejected, expired, cancelled, failed, or confirmed with another reference,
    or if its event holds no tickets (its purchases are confirmed as they are decided);
    confirming again with the same reference changes nothing."""
    body = await request.body()
    answer = await purchase_contract.confirm(purchases, request.scope, purchase_id, body)
    return answer.response()


@router.post(
    purchase_contract.CANCEL_PATH,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=LifecycleAccepted,
    responses={
        **with_headers(202, "Location", "Retry-After"),
        # It reads no body, but one sent anyway is judged as on every POST.
        **problem_responses(400, 404, 409, 413, 415, 422, 503),
    },
)
async def cancel_purchase(
    purchase_id: UUID, request: Request, purchases: PurchaseServiceDep
) -> Response:
    """Cancel a pending, held or confirmed purchase; its tickets go back on sale. 409 if it is
    rejected or expired, or its event has started; cancelling again changes nothing."""
    body = await request.body()
    answer = await purchase_contract.cancel(purchases, request.scope, purchase_id, body)
    return answer.response()
