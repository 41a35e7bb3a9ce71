"""Partition leases in PostgreSQL: who consumes which partition, and the epoch that fences commits.

All workers compute the same balanced assignment of partitions to the live members (see
worker/membership.py); each takes the leases assigned to it once they are free (released
by their previous owner, or expired). Taking a lease raises its epoch, and every commit checks the
epoch inside its transaction, so a worker that lost its lease (paused, partitioned away) can never
commit again. See README, "Partitions and leases".
"""

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from shared.db import Connection

ENSURE_PARTITIONS = """
    INSERT INTO partition_leases (partition)
    SELECT generate_series(0, $1::int - 1)
    ON CONFLICT (partition) DO NOTHING
"""

# Free, expired, or held by an earlier incarnation of this worker id: take it and raise the epoch,
# which fences out whoever held it before. SKIP LOCKED: a lease row locked by a commit in flight
# (its fence, FOR KEY SHARE) or by a renewal is simply "not free yet"; waiting on it would stall this worker's whole
# loop behind another worker that may be frozen mid-commit.
ACQUIRE = """
    UPDATE partition_leases AS l
    SET owner = $2, epoch = l.epoch + 1, expires_at = now() + make_interval(secs => $3),
        updated_at = now()
    FROM (
        SELECT partition, owner FROM partition_leases
        WHERE partition = $1
        FOR UPDATE SKIP LOCKED
    ) AS before
    WHERE l.partition = before.partition
      AND (l.owner IS NULL OR l.owner = $2 OR l.expires_at <= now())
    RETURNING l.epoch, before.owner AS previous_owner
"""

# Each held lease on its own: one locked by a commit in flight (its fence, FOR KEY SHARE) does
# not conflict with FOR NO KEY UPDATE and is renewed like the rest; one locked by another worker's
# acquire attempt (FOR UPDATE) is skipped this time rather than waited for, so no lease's renewal
# ever waits behind another.
RENEW = """
    WITH mine AS (
        SELECT l.partition
        FROM partition_leases AS l
        JOIN unnest($2::int[], $3::bigint[]) AS held(partition, epoch)
          ON l.partition = held.partition AND l.epoch = held.epoch
        WHERE l.owner = $1
        FOR NO KEY UPDATE OF l SKIP LOCKED
    )
    UPDATE partition_leases AS l
    SET expires_at = now() + make_interval(secs => $4), updated_at = now()
    FROM mine
    WHERE l.partition = mine.partition
    RETURNING l.partition
"""

# The held leases a renewal skipped that are still ours (unexpired, same owner and epoch).
STILL_HELD = """
    SELECT l.partition
    FROM partition_leases AS l
    JOIN unnest($2::int[], $3::bigint[]) AS held(partition, epoch)
      ON l.partition = held.partition AND l.epoch = held.epoch
    WHERE l.owner = $1 AND l.expires_at > now()
"""

RELEASE = """
    UPDATE partition_leases
    SET owner = NULL, expires_at = NULL, updated_at = now()
    WHERE partition = $1 AND owner = $2 AND epoch = $3
"""

# FOR KEY SHARE: a takeover (ACQUIRE's FOR UPDATE) skips this row until the commit holding it is
# done, so a commit that passed this check is never overtaken halfway; a renewal (FOR NO KEY
# UPDATE) does not conflict with it, so a slow commit never holds up its lease's renewal.
FENCE = """
    SELECT now() FROM partition_leases
    WHERE partition = $1 AND owner = $2 AND epoch = $3
    FOR KEY SHARE
"""

LIVE_OWNERS = """
    SELECT partition, owner FROM partition_leases WHERE owner IS NOT NULL AND expires_at > now()
"""

LEASES = """
    SELECT partition, owner, epoch, expires_at, expires_at > now() AS live
    FROM partition_leases
    ORDER BY partition
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """The fencing token a consumer commits under: its partition, at the epoch it acquired."""

    partition: int
    owner: str
    epoch: int


class LeaseLost(Exception):
    """This worker no longer holds the partition's lease at the epoch it consumed under."""


def _score(worker_id: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{worker_id}/{partition}".encode(), digest_size=8).digest()


def assign(
    partitions: int, workers: Sequence[str], owners: Mapping[int, str | None] | None = None
) -> dict[int, str]:
    """Spread partitions over workers evenly (each gets floor or ceil of P/N) and stably.

    Sticky: a live worker keeps the partitions it holds (`owners`) up to its fair share, so a
    join or a leave moves only what must move. The rest go by rendezvous hashing, within each
    worker's capacity. Every worker computes this from the same lease table and live list.
    """
    live = sorted(set(workers), key=lambda w: hashlib.blake2b(w.encode()).digest())
    if not live:
        return {}
    held: dict[str, list[int]] = {worker: [] for worker in live}
    for partition, holder in sorted((owners or {}).items()):
        if holder in held and 0 <= partition < partitions:
            held[holder].append(partition)
    # The extra partitions of an uneven split go to those holding the most: fewer moves.
    base, extra = divmod(partitions, len(live))
    by_holding = sorted(live, key=lambda w: -len(held[w]))  # stable: ties keep hash order
    capacity = {worker: base + (1 if i < extra else 0) for i, worker in enumerate(by_holding)}

    owner: dict[int, str] = {}
    for worker in live:
        keep = sorted(held[worker], key=lambda p: _score(worker, p), reverse=True)
        for partition in keep[: capacity[worker]]:
            owner[partition] = worker
            capacity[worker] -= 1
    for partition in range(partitions):
        if partition in owner:
            continue
        ranked = sorted(live, key=lambda w: _score(w, partition), reverse=True)
        chosen = next(w for w in ranked if capacity[w] > 0)
        capacity[chosen] -= 1
        owner[partition] = chosen
    return owner


async def ensure_partitions(conn: Connection, partitions: int) -> None:
    await conn.execute(ENSURE_PARTITIONS, partitions)


@dataclass(frozen=True, slots=True)
class Acquired:
    epoch: int
    previous_owner: str | None  # another worker's id when its expired lease was taken over


async def acquire(
    conn: Connection, partition: int, worker_id: str, ttl_s: float
) -> Acquired | None:
    """Take the lease if free or expired; None while another live worker holds it."""
    row = await conn.fetchrow(ACQUIRE, partition, worker_id, ttl_s)
    return None if row is None else Acquired(row["epoch"], row["previous_owner"])


@dataclass(frozen=True, slots=True)
class Renewal:
    renewed: set[int]
    skipped: set[int]  # locked by another worker's acquire attempt this time; still ours
    lost: set[int]  # taken over, or expired and no longer ours


async def renew(conn: Connection, worker_id: str, held: Mapping[int, int], ttl_s: float) -> Renewal:
    """Extend each lease held (partition -> epoch), never waiting on a locked row."""
    partitions, epochs = list(held), list(held.values())
    rows = await conn.fetch(RENEW, worker_id, partitions, epochs, ttl_s)
    renewed = {row["partition"] for row in rows}
    if len(renewed) == len(held):
        return Renewal(renewed, set(), set())
    rows = await conn.fetch(STILL_HELD, worker_id, partitions, epochs)
    skipped = {row["partition"] for row in rows} - renewed
    return Renewal(renewed, skipped, set(held) - renewed - skipped)


async def release(conn: Connection, partition: int, worker_id: str, epoch: int) -> None:
    await conn.execute(RELEASE, partition, worker_id, epoch)


async def check_fence(conn: Connection, partition: int, worker_id: str, epoch: int) -> datetime:
    """Inside a commit's transaction: raise LeaseLost unless the lease is still ours; return
    the transaction's time (what its decisions are stamped with)."""
    now: datetime | None = await conn.fetchval(FENCE, partition, worker_id, epoch)
    if now is None:
        raise LeaseLost(f"partition {partition}: lease epoch {epoch} no longer held")
    return now


async def live_owners(conn: Connection) -> dict[int, str]:
    """Partition -> the worker holding an unexpired lease on it."""
    return {row["partition"]: row["owner"] for row in await conn.fetch(LIVE_OWNERS)}


async def all_leases(conn: Connection) -> list[dict[str, object]]:
    return [dict(row) for row in await conn.fetch(LEASES)]
