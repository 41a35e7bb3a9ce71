"""How far each partition's worker has decided: read for the wait ahead of pending purchases.

Every status of a pending purchase, and every pending purchase's event stream at each heartbeat,
asks for its partition's progress; in a flash sale that is thousands a second for a handful of
partitions. One read per partition serves everyone who asks within `max_age_s` of it, and those
who ask while it runs wait for it rather than read again.
"""

import asyncio
import logging

import asyncpg

from shared.purchases import repository

log = logging.getLogger(__name__)

# Each worker records its partition's progress at every commit and once a second while idle:
# a reading this old misses at most part of one record.
MAX_AGE_S = 0.5


class PartitionProgress:
    def __init__(self, pool: asyncpg.Pool, *, max_age_s: float = MAX_AGE_S) -> None:
        self._pool = pool
        self._max_age_s = max_age_s
        self._readings: dict[int, tuple[float, asyncio.Task[asyncpg.Record | None]]] = {}

    async def of(self, partition: int) -> asyncpg.Record | None:
        """The partition's progress row (None before its first record), at most max_age_s old.
        A failed read is not kept: the next caller reads again."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        reading = self._readings.get(partition)
        if reading is None or now - reading[0] > self._max_age_s:
            task = loop.create_task(self._read(partition))
            task.add_done_callback(lambda done: self._read_done(partition, done))
            reading = self._readings[partition] = (now, task)
        # Shielded: a caller that gives up (its client left) does not cancel the others' read.
        return await asyncio.shield(reading[1])

    async def _read(self, partition: int) -> asyncpg.Record | None:
        async with self._pool.acquire() as conn:
            row: asyncpg.Record | None = await repository.progress(conn, partition)
            return row

    def _read_done(self, partition: int, done: "asyncio.Task[asyncpg.Record | None]") -> None:
        if done.cancelled() or done.exception() is not None:  # retrieved: no warning if unread
            reading = self._readings.get(partition)
            if reading is not None and reading[1] is done:
                del self._readings[partition]
