"""A short-lived, per-process cache of events for the purchase path.

A flash sale sends thousands of requests a second for one event; reading its row for each would put
the flood back on PostgreSQL, which the queue exists to avoid. A stale entry is harmless: the
worker decides with the locked row (tickets, sales window, per-purchase and per-customer limits,
holds), the cache only serves fast rejects (unknown event, sold out, quantity over the event's
limit, outside the window). For the same reason, while the database cannot be read, the last
known entry is served (for up to STALE_IF_ERROR_S), so purchases keep being queued.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

from shared.events.models import Event

# Loads the events of the given ids; an id missing from the answer has no event.
Loader = Callable[[list[UUID]], Awaitable[dict[UUID, Event]]]

STALE_IF_ERROR_S = 300.0
# How long a caller waits for a load: a database that stalls (rather than refuses) would
# otherwise hold every purchase of the event for its statement timeout. With an older entry in
# hand the caller takes it after STALE_WAIT_S; with none, it fails (503) after LOAD_WAIT_S. The
# load itself goes on, and refreshes the entry if it ever answers.
STALE_WAIT_S = 1.0
LOAD_WAIT_S = 5.0
# At most this many entries refreshed ahead of their expiry by one load.
REFRESH_AHEAD_MAX = 1000


class EventCache:
    def __init__(
        self,
        load: Loader,
        *,
        ttl_s: float,
        max_entries: int = 100_000,
        stale_wait_s: float = STALE_WAIT_S,
        load_wait_s: float = LOAD_WAIT_S,
    ) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._stale_wait_s = stale_wait_s
        self._load_wait_s = load_wait_s
        # event id -> (loaded at, event or None when it does not exist)
        self._entries: dict[UUID, tuple[float, Event | None]] = {}
        # One load per event at a time, and one query for every event that needs loading at
        # once: with many events on sale, each expiring on its own, single reads would be a
        # query per event per TTL. A load runs as its own task, so that one caller's
        # cancellation does not fail the others.
        self._loading: dict[UUID, asyncio.Task[dict[UUID, Event]]] = {}
        self._gathering: tuple[asyncio.Task[dict[UUID, Event]], list[UUID]] | None = None

    async def get(self, event_id: UUID) -> Event | None:
        entry = self._entries.get(event_id)
        if entry is not None and time.monotonic() - entry[0] < self._ttl_s:
            return entry[1]
        task = self._loading.get(event_id)
        if task is None:
            task = self._join_next_load(event_id)
        usable = entry is not None and time.monotonic() - entry[0] < STALE_IF_ERROR_S
        try:
            # asyncio.timeout rather than wait_for, which (Python 3.11) swallows the caller's
            # cancellation when the load finishes at that moment: a status stream whose client
            # left would then go on for its whole lifetime.
            async with asyncio.timeout(self._stale_wait_s if usable else self._load_wait_s):
                loaded = await asyncio.shield(task)
        except Exception:  # the load failed, or is taking too long (TimeoutError)
            if entry is not None and usable:
                return entry[1]
            raise
        return loaded.get(event_id)

    def _join_next_load(self, event_id: UUID) -> asyncio.Task[dict[UUID, Event]]:
        """The load that has not started yet (it starts on the next turn of the loop), with
        `event_id` added to what it reads. A new load also takes along the entries past half
        their lifetime, so that entries expire together, a query for all of them, rather than
        each on its own."""
        if self._gathering is None:
            ids: list[UUID] = []
            task = asyncio.create_task(self._load_gathered(ids))
            self._gathering = (task, ids)
            for ageing in self._ageing():
                self._add(task, ids, ageing)
        task, ids = self._gathering
        if event_id not in self._loading:
            self._add(task, ids, event_id)
        return task

    def _ageing(self) -> list[UUID]:
        horizon = time.monotonic() - self._ttl_s / 2
        ageing = [i for i, (at, _) in self._entries.items() if at <= horizon]
        return [i for i in ageing[:REFRESH_AHEAD_MAX] if i not in self._loading]

    def _add(self, task: asyncio.Task[dict[UUID, Event]], ids: list[UUID], event_id: UUID) -> None:
        ids.append(event_id)
        self._loading[event_id] = task
        task.add_done_callback(lambda _: self._loading.pop(event_id, None))

    async def _load_gathered(self, ids: list[UUID]) -> dict[UUID, Event]:
        self._gathering = None  # from here on, new misses gather for the next load
        loaded = await self._load(ids)
        now = time.monotonic()
        if len(self._entries) + len(ids) > self._max_entries:
            self._entries.clear()  # crude but bounded; a refill costs a read per hot event
        for event_id in ids:
            self._entries[event_id] = (now, loaded.get(event_id))
        return loaded
