"""The purchase path's event cache: one query for every event that needs loading at once, one
load per event at a time, and the last known event while the database cannot be read."""

import asyncio
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from shared.events.cache import EventCache
from shared.events.models import Event

NOW = datetime(2027, 1, 1, tzinfo=UTC)


def event(event_id: UUID, available: int = 10) -> Event:
    return Event(
        id=event_id,
        name="e",
        description=None,
        venue=None,
        starts_at=NOW,
        total_tickets=10,
        available_tickets=available,
        max_tickets_per_purchase=10,
        sales_start_at=None,
        sales_end_at=None,
        max_tickets_per_customer=None,
        hold_seconds=None,
        version=1,
        created_at=NOW,
        updated_at=NOW,
    )


class Loader:
    def __init__(self, known: dict[UUID, Event]) -> None:
        self.known = known
        self.calls: list[list[UUID]] = []
        self.failing = False

    async def __call__(self, ids: list[UUID]) -> dict[UUID, Event]:
        self.calls.append(list(ids))
        await asyncio.sleep(0)
        if self.failing:
            raise ConnectionError("database down")
        return {i: self.known[i] for i in ids if i in self.known}


async def test_misses_of_many_events_at_once_are_one_query() -> None:
    ids = [uuid4() for _ in range(50)]
    loader = Loader({i: event(i) for i in ids})
    cache = EventCache(loader, ttl_s=60)

    found = await asyncio.gather(*(cache.get(i) for i in ids), *(cache.get(i) for i in ids))

    assert [e.id if e else None for e in found] == ids + ids
    assert len(loader.calls) == 1
    assert sorted(loader.calls[0]) == sorted(ids)  # each id read once


async def test_a_fresh_entry_is_served_without_a_query_and_an_unknown_event_is_none() -> None:
    known, unknown = uuid4(), uuid4()
    loader = Loader({known: event(known)})
    cache = EventCache(loader, ttl_s=60)

    assert await cache.get(unknown) is None
    first = await cache.get(known)
    again = await cache.get(known)

    assert first is again
    assert await cache.get(unknown) is None
    assert len(loader.calls) == 2


async def test_an_expired_entry_is_read_again() -> None:
    known = uuid4()
    loader = Loader({known: event(known, available=10)})
    cache = EventCache(loader, ttl_s=0)
    assert (await cache.get(known)) is not None
    loader.known[known] = event(known, available=0)

    refreshed = await cache.get(known)

    assert refreshed is not None
    assert refreshed.available_tickets == 0


async def test_while_the_database_is_down_the_last_known_event_is_served() -> None:
    known, never_seen = uuid4(), uuid4()
    loader = Loader({known: event(known)})
    cache = EventCache(loader, ttl_s=0)
    assert await cache.get(known) is not None
    loader.failing = True

    assert await cache.get(known) is not None
    with pytest.raises(ConnectionError):
        await cache.get(never_seen)


async def test_a_load_takes_along_the_entries_past_half_their_lifetime() -> None:
    """So that entries loaded at different times come to expire together, and many events on
    sale cost a query per half lifetime rather than one per event."""
    early, late = uuid4(), uuid4()
    loader = Loader({early: event(early), late: event(late)})
    cache = EventCache(loader, ttl_s=0.4)
    await cache.get(early)
    await asyncio.sleep(0.25)  # past half of early's lifetime, not yet expired

    await cache.get(late)

    assert loader.calls == [[early], [early, late]]


class StalledLoader(Loader):
    """A database that answers nothing, refuses nothing: each load waits until released."""

    def __init__(self, known: dict[UUID, Event]) -> None:
        super().__init__(known)
        self.stalled = False
        self.released = asyncio.Event()

    async def __call__(self, ids: list[UUID]) -> dict[UUID, Event]:
        if self.stalled:
            await self.released.wait()
        return await super().__call__(ids)


async def test_a_stalled_load_is_waited_for_briefly_then_the_last_known_event_is_served() -> None:
    known = uuid4()
    loader = StalledLoader({known: event(known)})
    cache = EventCache(loader, ttl_s=0, stale_wait_s=0.05, load_wait_s=0.5)
    assert await cache.get(known) is not None
    loader.stalled = True

    started = asyncio.get_running_loop().time()
    served = await cache.get(known)

    assert served is not None
    assert served.id == known
    assert asyncio.get_running_loop().time() - started < 0.4  # not the whole load's wait
    loader.released.set()


async def test_a_stalled_load_of_an_event_never_seen_fails_after_the_load_wait() -> None:
    loader = StalledLoader({})
    loader.stalled = True
    cache = EventCache(loader, ttl_s=60, stale_wait_s=0.05, load_wait_s=0.2)

    with pytest.raises(TimeoutError):
        await cache.get(uuid4())
    loader.released.set()
