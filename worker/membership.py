"""Worker membership in PostgreSQL: who is live, and one process per WORKER_ID.

Every worker heartbeats a row in `workers`; the live rows are who the partitions are spread over
(worker/leases.py). Each process run is an incarnation with its own id: a process started with a
WORKER_ID whose row is still live is refused, so two processes never take each other's leases
back and forth. A restart after a crash waits until its dead predecessor's row expires (at most
one lease lifetime) and then takes the id over.
"""

import asyncio
import time
from uuid import UUID

from shared.db import Connection
from shared.errors import StartupError

# Join: take the id if it is new, or if its last holder stopped heartbeating (it died).
JOIN = """
    INSERT INTO workers (worker_id, incarnation, started_at, heartbeat_at, expires_at)
    VALUES ($1, $2, now(), now(), now() + make_interval(secs => $3))
    ON CONFLICT (worker_id) DO UPDATE
        SET incarnation = excluded.incarnation, started_at = excluded.started_at,
            heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at
        WHERE workers.expires_at <= now() OR workers.incarnation = excluded.incarnation
    RETURNING worker_id
"""

# Only this incarnation's row: a process frozen past its lifetime whose id was taken over by a
# new incarnation finds nothing to renew, and stops.
HEARTBEAT = """
    UPDATE workers SET heartbeat_at = now(), expires_at = now() + make_interval(secs => $3)
    WHERE worker_id = $1 AND incarnation = $2
    RETURNING worker_id
"""

LIVE_HOLDER = """
    SELECT extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s
    FROM workers WHERE worker_id = $1 AND expires_at > now()
"""

LIVE_WORKERS = "SELECT worker_id FROM workers WHERE expires_at > now() ORDER BY worker_id"

LEAVE = "DELETE FROM workers WHERE worker_id = $1 AND incarnation = $2"

FORGET_LONG_DEAD_WORKERS = "DELETE FROM workers WHERE expires_at < now() - interval '1 day'"


class WorkerIdInUse(StartupError):
    """Another live process holds this WORKER_ID."""


async def join(
    conn: Connection, worker_id: str, incarnation: UUID, ttl_s: float, *, wait_s: float
) -> None:
    """Become the live holder of `worker_id`. A holder that stops heartbeating (a crashed
    predecessor) is waited out for up to `wait_s`; one still heartbeating then is refused."""
    deadline = time.monotonic() + wait_s
    while await conn.fetchval(JOIN, worker_id, incarnation, ttl_s) is None:
        if time.monotonic() >= deadline:
            age = await conn.fetchval(LIVE_HOLDER, worker_id)
            seen = "" if age is None else f" (its last heartbeat {float(age):.1f} s ago)"
            raise WorkerIdInUse(
                f"WORKER_ID {worker_id!r} is already used by a live worker{seen}: give every "
                "worker process its own WORKER_ID (the default, <hostname>-<pid>, is unique)."
            )
        await asyncio.sleep(min(0.2, ttl_s / 10))


async def heartbeat(conn: Connection, worker_id: str, incarnation: UUID, ttl_s: float) -> bool:
    """Extend this incarnation's membership; False when its id now belongs to another one."""
    return await conn.fetchval(HEARTBEAT, worker_id, incarnation, ttl_s) is not None


async def live_workers(conn: Connection) -> list[str]:
    return [row["worker_id"] for row in await conn.fetch(LIVE_WORKERS)]


async def leave(conn: Connection, worker_id: str, incarnation: UUID) -> None:
    await conn.execute(LEAVE, worker_id, incarnation)


async def forget_long_dead_workers(conn: Connection) -> None:
    await conn.execute(FORGET_LONG_DEAD_WORKERS)
