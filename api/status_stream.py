"""Server-sent events of a purchase's status: `GET /purchases/{id}/events`.

The first event is the purchase as it is, then one on every change; each event's `id` is its
status, so a client that reconnects with `Last-Event-ID` is not sent again what it has (a
purchase never returns to a status it left; a pending one's heartbeats, below, repeat it).
Every `heartbeat_s` without a change, something keeps proxies from closing the idle stream: for
a pending purchase this replica accepted, the purchase again with the wait ahead of it now
(`queue`); a comment otherwise. The stream ends after a status that can no longer change, or
after `max_s`, or when the process is stopping; the client then reconnects (the browser's
EventSource does so by itself, after the `retry` each event names).

An open stream (`EventStream`) sends itself: the route hands it to Starlette as a response, the
raw-ASGI dispatch (api/fast_paths.py) sends it as it is, through the same code. Thousands are held
at once, so each costs one task besides its request's: the one that notices the client leaving,
and stops the stream then rather than at its next heartbeat.
"""

import asyncio
import contextlib
import logging
import random
from typing import Any
from uuid import UUID

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shared.errors import ServiceUnavailable
from shared.purchases.changes import StatusWaiters
from shared.purchases.models import Purchase, PurchaseStatus
from shared.purchases.service import PurchaseService, StatusFollower
from shared.retry import DATABASE_UNAVAILABLE, TRANSIENT_DATABASE

log = logging.getLogger(__name__)

HEADERS = {"cache-control": "no-store", "x-accel-buffering": "no"}
MEDIA_TYPE = "text/event-stream; charset=utf-8"
_START_HEADERS = [
    *((name.encode(), value.encode()) for name, value in HEADERS.items()),
    (b"content-type", MEDIA_TYPE.encode()),
]
# Statuses nothing moves a purchase out of (a confirmed one may still be cancelled, a failed one
# decided when its message is replayed).
SETTLED = frozenset({PurchaseStatus.REJECTED, PurchaseStatus.EXPIRED, PurchaseStatus.CANCELLED})
HEARTBEAT = b": heartbeat\n\n"
# The reconnection delays streams ask of the browser, in milliseconds (EventSource's own is
# about 3 s).
RECONNECT_MS = (1_000, 5_000)
# How long a heartbeat may wait for a pending purchase's wait ahead before it is a comment.
BEAT_READ_S = 1.0
# What a stream waits for a purchase to no longer be, built once rather than on every wait.
_OTHER_THAN = {status: frozenset({status.value}) for status in PurchaseStatus}


def status_event(purchase: Purchase) -> bytes:
    """The purchase as an event, with the delay after which the browser reconnects once the
    stream ends: drawn at random, so that the thousands of streams a stopping replica ends at
    once do not come back at once."""
    return (
        f"id: {purchase.status.value}\nevent: status\ndata: ".encode()
        + purchase.model_dump_json().encode()
        + f"\nretry: {random.randint(*RECONNECT_MS)}\n\n".encode()
    )


async def open_stream(
    service: PurchaseService,
    waiters: StatusWaiters[Purchase],
    purchase_id: UUID,
    *,
    last_event_id: str | None,
    heartbeat_s: float,
    max_s: float,
) -> "EventStream | None":
    """The stream (None: there will be no event). Refusals (404 never issued, 503) are raised
    here, before any byte of the stream is sent, so that they are answered as problems."""
    first = await service.status(purchase_id)
    if first.status in SETTLED and first.status.value == last_event_id:
        return None  # nothing will follow what the client has: 204 tells EventSource to stop
    return EventStream(service, waiters, first, last_event_id, heartbeat_s=heartbeat_s, max_s=max_s)


class EventStream:
    """An open stream of a purchase's events, to be sent as one chunked 200 answer.

    Thousands are held at once, each for minutes, so a stream keeps its status rather than the
    purchase (about 1 KB), and one coroutine (`send`) does all its work: every frame between the
    request's task and its wait is kept for as long as it waits."""

    __slots__ = (
        "_first",
        "_heartbeat_s",
        "_left",
        "_max_s",
        "_purchase_id",
        "_service",
        "_status",
        "_task",
        "_waiters",
        "started",
    )

    def __init__(
        self,
        service: PurchaseService,
        waiters: StatusWaiters[Purchase],
        first: Purchase,
        last_event_id: str | None,
        *,
        heartbeat_s: float,
        max_s: float,
    ) -> None:
        self._service = service
        self._waiters = waiters  # what ends the pause between two reads once stopping
        self._purchase_id, self._status = first.purchase_id, first.status
        self._first = status_event(first) if first.status.value != last_event_id else None
        self._heartbeat_s, self._max_s = heartbeat_s, max_s
        self._task: asyncio.Task[Any] | None = None  # while it streams
        self._left = False
        self.started = False  # once its 200 is sent, a failure can only cut it short

    def response(self) -> Response:
        return _StreamResponse(self)

    async def send(
        self, receive: Receive, send: Send, *, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        """Send every event, then end the answer; if the client goes away first, stop there.

        A second task waits for the client's disconnect and cancels this one (uvicorn sends into
        a closed connection without complaint, so without it a stream would find out only at
        its end)."""
        task = self._task = asyncio.current_task()
        assert task is not None
        gone = asyncio.ensure_future(_disconnected(receive))
        gone.add_done_callback(self._client_gone)
        service, status = self._service, self._status
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_s
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [*_START_HEADERS, *extra]}
            )
            self.started = True
            event, self._first = self._first, None
            # Read just now, before a heartbeat: the next wait starts with a pause, not a read.
            fresh = False
            with service.follow(self._purchase_id) as follower:
                while True:
                    if event is not None:
                        await send({"type": "http.response.body", "body": event, "more_body": True})
                        event = None  # not kept while the stream waits for the next one
                    # Past a status that cannot change, or once the process is stopping (the
                    # client reconnects elsewhere), there is nothing more to send.
                    if status in SETTLED or service.draining:
                        break
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    wait_s = min(self._heartbeat_s, remaining)
                    until = loop.time() + wait_s
                    changed = None if fresh else await _change(follower, status, wait_s)
                    fresh = False
                    if changed is None and not service.draining:
                        # Nothing changed. A wait that ended early (the database down, too many
                        # waiters) pauses for the rest, so that heartbeats keep their pace; the
                        # pause ends once the process is stopping, and so does the stream.
                        await self._waiters.pause(max(0.0, until - loop.time()))
                        if service.draining:
                            continue
                        if follower.unheard:
                            # Past the bound of waiters no commit wakes this stream: read before
                            # the heartbeat, or it would say `pending` of a purchase decided
                            # during the pause.
                            changed, fresh = await _change(follower, status, 0), True
                    if changed is not None:
                        status, event = changed.status, status_event(changed)
                        changed = None  # not kept while the stream waits
                    elif not service.draining:
                        event = await self._beat(status)
        except asyncio.CancelledError:
            if not self._left or task.uncancel() > 0:
                raise  # not (only) the client leaving: the server is cancelling the request
            return
        finally:
            self._task = None
            gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _beat(self, status: PurchaseStatus) -> bytes:
        """What keeps an idle stream open: for a pending purchase this replica accepted, the
        purchase again with the wait ahead of it now (it shrinks as the worker advances); a
        comment otherwise."""
        if status != PurchaseStatus.PENDING:
            return HEARTBEAT
        pending = None
        # Bounded: a database that stalls must not hold the heartbeat (a proxy would close the
        # idle stream) nor the stream's end once the process is stopping.
        with contextlib.suppress(*TRANSIENT_DATABASE):
            async with asyncio.timeout(BEAT_READ_S):
                pending = await self._service.still_pending(self._purchase_id)
        return HEARTBEAT if pending is None else status_event(pending)

    def _client_gone(self, gone: "asyncio.Future[None]") -> None:
        if gone.cancelled():
            return
        if (error := gone.exception()) is not None:  # the stream will end at its lifetime
            log.warning("cannot tell when a status stream's client leaves: %r", error)
        elif self._task is not None:
            self._left = True
            self._task.cancel()


async def _change(
    follower: StatusFollower, status: PurchaseStatus, wait_s: float
) -> Purchase | None:
    """The purchase once its status is other than `status` (within `wait_s`), else None; a
    database that cannot tell now is no change."""
    changed = None
    with contextlib.suppress(ServiceUnavailable, *DATABASE_UNAVAILABLE):
        changed = await follower.change(unlike=_OTHER_THAN[status], wait_s=wait_s)
    return changed if changed is not None and changed.status != status else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _StreamResponse(Response):
    """An EventStream as the route's response: the stream sends its own status and headers,
    and any the framework added to these."""

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_START_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        added = tuple(self.raw_headers[len(_START_HEADERS) :])
        await self._stream.send(receive, send, extra=added)
