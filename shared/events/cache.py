"""A short-lived, per-process cache of events for the purchase path.

A flash sale sends thousands of requests a second for one event; reading its row for each would put
the flood back on PostgreSQL, which the queue exists to avoid. A stale entry is harmless: the
worker decides with the locked row, the cache only serves fast rejects (unknown event, sold out,
quantity over the event's limit). For the same reason, while the database cannot be read, the
last known entry is served (for up to STALE_IF_ERROR_S), so purchases keep being queued.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

from shared.events.models import Event

Loader = Callable[[UUID], Awaitable[Event | None]]

STALE_IF_ERROR_S = 300.0


class EventCache:
    def __init__(self, load: Loader, *, ttl_s: float, max_entries: int = 100_000) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        # event id -> (loaded at, event or None when it does not exist)
        self._entries: dict[UUID, tuple[float, Event | None]] = {}
        # One load per event at a time: the first request of a burst reads, the rest wait for it.
        # The load runs as its own task so that one caller's cancellation does not fail the others.
        self._loading: dict[UUID, asyncio.Task[Event | None]] = {}

    async def get(self, event_id: UUID) -> Event | None:
        entry = self._entries.get(event_id)
        if entry is not None and time.monotonic() - entry[0] < self._ttl_s:
            return entry[1]
        task = self._loading.get(event_id)
        if task is None:
            task = asyncio.create_task(self._refresh(event_id))
            self._loading[event_id] = task
            task.add_done_callback(lambda _: self._loading.pop(event_id, None))
        return await asyncio.shield(task)

    async def _refresh(self, event_id: UUID) -> Event | None:
        try:
            event = await self._load(event_id)
        except Exception:
            entry = self._entries.get(event_id)
            if entry is not None and time.monotonic() - entry[0] < STALE_IF_ERROR_S:
                return entry[1]
            raise
        self._store(event_id, event)
        return event

    def _store(self, event_id: UUID, event: Event | None) -> None:
        if len(self._entries) >= self._max_entries:
            self._entries.clear()  # crude but bounded; a refill costs one read per hot event
        self._entries[event_id] = (time.monotonic(), event)
