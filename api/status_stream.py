"""Server-sent events of a purchase's status: `GET /purchases/{id}/events`.

The first event is the purchase as it is, then one on every change; each event's `id` is its
status, so a client that reconnects with `Last-Event-ID` is not sent again what it has (a
purchase never returns to a status it left). A comment every `heartbeat_s` keeps proxies from
closing an idle stream. The stream ends after a status that can no longer change, or after
`max_s`, or when the process is stopping; the client then reconnects (the browser's
EventSource does so by itself).
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from uuid import UUID

from shared.errors import ServiceUnavailable
from shared.purchases.models import Purchase, PurchaseStatus
from shared.purchases.service import PurchaseService
from shared.retry import DATABASE_UNAVAILABLE

HEADERS = {"cache-control": "no-store", "x-accel-buffering": "no"}
# Statuses nothing moves a purchase out of (a confirmed one may still be cancelled, a failed one
# decided when its message is replayed).
SETTLED = frozenset({PurchaseStatus.REJECTED, PurchaseStatus.EXPIRED, PurchaseStatus.CANCELLED})
HEARTBEAT = b": heartbeat\n\n"


def status_event(purchase: Purchase) -> bytes:
    return (
        f"id: {purchase.status.value}\nevent: status\ndata: ".encode()
        + purchase.model_dump_json().encode()
        + b"\n\n"
    )


async def open_stream(
    service: PurchaseService,
    purchase_id: UUID,
    *,
    last_event_id: str | None,
    heartbeat_s: float,
    max_s: float,
) -> AsyncIterator[bytes] | None:
    """The stream's events (None: there will be none). Refusals (404 never issued, 503) are raised here, before any byte of
    the stream is sent, so that they are answered as problems."""
    first = await service.status(purchase_id)
    if first.status in SETTLED and first.status.value == last_event_id:
        return None  # nothing will follow what the client has: 204 tells EventSource to stop
    return _events(service, first, last_event_id, heartbeat_s=heartbeat_s, max_s=max_s)


async def _events(
    service: PurchaseService,
    first: Purchase,
    last_event_id: str | None,
    *,
    heartbeat_s: float,
    max_s: float,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    sent = last_event_id
    purchase = first
    while True:
        if purchase.status.value != sent:
            yield status_event(purchase)
            sent = purchase.status.value
        # Past a status that cannot change, or once the process is stopping (the client
        # reconnects elsewhere), there is nothing more to send.
        if purchase.status in SETTLED or service.draining:
            return
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        changed = await _wait_for_change(service, purchase, timeout_s=min(heartbeat_s, remaining))
        if changed is not None:
            purchase = changed
        elif not service.draining:
            yield HEARTBEAT


async def _wait_for_change(
    service: PurchaseService, purchase: Purchase, *, timeout_s: float
) -> Purchase | None:
    """The purchase once its status changed within `timeout_s`, else None (after `timeout_s`:
    when the wait ends early, the database down or too many waiters, the rest is slept)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout_s
    with contextlib.suppress(ServiceUnavailable, *DATABASE_UNAVAILABLE):
        latest = await service.wait_status(
            purchase.purchase_id, unlike=frozenset({purchase.status.value}), wait_s=timeout_s
        )
        if latest.status != purchase.status:
            return latest
    if not service.draining:
        await asyncio.sleep(max(0.0, until - loop.time()))
    return None
