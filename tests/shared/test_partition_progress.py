"""One read of a partition's progress serves every status asking within its max age."""

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from shared.purchases import repository
from shared.purchases.progress import PartitionProgress


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The partitions read from the database, in order (each read still goes to it)."""
    made: list[int] = []
    real = repository.progress

    async def counted(conn: Any, partition: int) -> asyncpg.Record | None:
        made.append(partition)
        row: asyncpg.Record | None = await real(conn, partition)
        return row

    monkeypatch.setattr(repository, "progress", counted)
    return made


async def record(db: asyncpg.Pool, partition: int) -> None:
    await db.execute(
        "INSERT INTO partition_progress (partition, horizon, recorded_at, rate) "
        "VALUES ($1, now(), now(), 10) ON CONFLICT (partition) DO UPDATE SET horizon = now()",
        partition,
    )


async def test_concurrent_asks_share_one_read_per_partition(
    db: asyncpg.Pool, reads: list[int]
) -> None:
    await record(db, 0)
    progress = PartitionProgress(db, max_age_s=60)

    rows = await asyncio.gather(*(progress.of(0) for _ in range(50)), progress.of(1))

    assert sorted(reads) == [0, 1]
    assert all(row is not None and row["rate"] == 10 for row in rows[:50])
    assert rows[50] is None  # no record yet


async def test_a_reading_older_than_its_max_age_is_read_again(
    db: asyncpg.Pool, reads: list[int]
) -> None:
    await record(db, 0)
    progress = PartitionProgress(db, max_age_s=0.1)

    first = await progress.of(0)
    await record(db, 0)
    await progress.of(0)  # within the max age: the same reading
    await asyncio.sleep(0.2)
    later = await progress.of(0)

    assert reads == [0, 0]
    assert first is not None
    assert later is not None
    assert later["horizon"] > first["horizon"]


async def test_a_failed_read_is_not_kept_and_a_caller_leaving_cancels_no_one_elses(
    db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    await record(db, 0)
    progress = PartitionProgress(db, max_age_s=60)
    real = repository.progress

    async def down(conn: Any, partition: int) -> asyncpg.Record | None:
        raise ConnectionResetError("the database went away")

    monkeypatch.setattr(repository, "progress", down)
    with pytest.raises(ConnectionResetError):
        await progress.of(0)
    monkeypatch.setattr(repository, "progress", real)

    leaving = asyncio.ensure_future(progress.of(0))
    staying = asyncio.ensure_future(progress.of(0))
    await asyncio.sleep(0)
    leaving.cancel()
    row = await staying

    assert row is not None
    assert row["rate"] == 10


async def _record_after(db: asyncpg.Pool, gap_s: float, decided_s: float) -> float | None:
    """Partition 0's rate once its owner records `decided_s` more of accepted time decided,
    `gap_s` after its last record (made at a pace of 1)."""
    async with db.acquire() as conn:
        before = await conn.fetchval(
            "UPDATE partition_progress SET recorded_at = now() - make_interval(secs => $1) "
            "WHERE partition = 0 RETURNING horizon",
            gap_s,
        )
        await repository.record_progress(conn, 0, before + timedelta(seconds=decided_s))
        rate: float | None = await conn.fetchval(
            "SELECT rate FROM partition_progress WHERE partition = 0"
        )
        return rate


async def test_the_pace_is_measured_anew_after_a_time_nobody_recorded(db: asyncpg.Pool) -> None:
    """A worker stopped for 10 s decides half a second of backlog: no pace of 0.05 (which made
    the first waits after a restart 20-40 times too long), but none until the next record."""
    await db.execute(
        "INSERT INTO partition_progress (partition, horizon, recorded_at, rate) "
        "VALUES (0, now() - interval '30 s', now(), 1)"
    )
    assert await _record_after(db, gap_s=1.0, decided_s=1.0) == pytest.approx(1.0, rel=0.1)
    assert await _record_after(db, gap_s=10.0, decided_s=0.5) is None
    assert await _record_after(db, gap_s=1.0, decided_s=1.0) == pytest.approx(1.0, rel=0.1)
