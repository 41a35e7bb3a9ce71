"""Partition leases: the assignment every worker computes, the lease SQL (acquire, renew, release,
epochs), and fencing: a commit under a lease that was taken over raises LeaseLost and writes
nothing."""

import asyncio
import math
import random
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.messages import PurchaseRequested
from shared.purchases.models import PurchaseStatus
from shared.settings import Settings
from tests.factories import assert_no_oversell, create_event
from tests.fuzzing import property_settings, seed
from worker import leases
from worker.leases import Lease, LeaseLost, assign
from worker.processor import apply_batch

PROPERTY = property_settings(max_examples=200)

worker_names = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12),
    min_size=1,
    max_size=20,
    unique=True,
)
partition_counts = st.integers(min_value=1, max_value=128)


def moved(before: dict[int, str], after: dict[int, str]) -> int:
    return sum(1 for partition, owner in after.items() if before.get(partition) != owner)


# --- assign() ----------------------------------------------------------------------------------


@PROPERTY
@given(partition_counts, worker_names)
def test_every_partition_is_assigned_to_one_of_the_workers(
    partitions: int, workers: list[str]
) -> None:
    owner = assign(partitions, workers)
    assert sorted(owner) == list(range(partitions))
    assert set(owner.values()) <= set(workers)


@PROPERTY
@given(partition_counts, worker_names)
def test_each_worker_gets_the_floor_or_the_ceiling_of_its_fair_share(
    partitions: int, workers: list[str]
) -> None:
    counts = Counter(assign(partitions, workers).values())
    low, high = partitions // len(workers), math.ceil(partitions / len(workers))
    for worker in workers:
        assert low <= counts.get(worker, 0) <= high, (worker, counts)


@PROPERTY
@given(partition_counts, worker_names, st.randoms(use_true_random=False))
def test_assignment_does_not_depend_on_the_order_or_repetition_of_the_workers(
    partitions: int, workers: list[str], rnd: random.Random
) -> None:
    shuffled = [*workers, *rnd.sample(workers, k=min(3, len(workers)))]
    rnd.shuffle(shuffled)
    assert assign(partitions, shuffled) == assign(partitions, workers)


def test_no_live_worker_means_no_assignment() -> None:
    assert assign(8, []) == {}


def test_one_worker_gets_every_partition() -> None:
    assert assign(6, ["solo"]) == dict.fromkeys(range(6), "solo")


@PROPERTY
@given(st.integers(min_value=2, max_value=128), worker_names, st.text(min_size=1, max_size=12))
def test_adding_a_worker_moves_a_bounded_share_of_the_partitions(
    partitions: int, workers: list[str], newcomer: str
) -> None:
    """Regression guard that the implementation meets: when workers are at most half as many as
    partitions, a join moves the newcomer's fair share plus at most a quarter of the partitions
    (rehashing modulo N would move nearly all of them)."""
    if newcomer in workers or len(workers) + 1 > partitions // 2:
        return
    before = assign(partitions, workers)
    # Workers pass the current owners (the lease table), which is what keeps the spread sticky.
    after = assign(partitions, [*workers, newcomer], before)
    share = math.ceil(partitions / (len(workers) + 1))
    assert moved(before, after) <= share + partitions // 4 + 2


@pytest.mark.fuzz
def test_adding_a_worker_moves_on_average_little_more_than_its_fair_share() -> None:
    """Over many random clusters of the default 32 partitions and 2..8 workers, a join moves on
    average at most twice the newcomer's fair share."""
    rnd = random.Random(seed(7))
    for size in range(2, 9):
        total = 0
        trials = 100
        for _ in range(trials):
            workers = [f"host-{rnd.getrandbits(40):x}" for _ in range(size + 1)]
            total += moved(assign(32, workers[:-1]), assign(32, workers))
        assert total / trials <= 2 * math.ceil(32 / (size + 1)), size


@PROPERTY
@given(st.integers(min_value=2, max_value=64), worker_names, st.text(min_size=1, max_size=12))
def test_adding_a_worker_moves_at_most_its_fair_share_plus_a_few(
    partitions: int, workers: list[str], newcomer: str
) -> None:
    if newcomer in workers:
        return
    before = assign(partitions, workers)
    # Workers pass the current owners (the lease table), which is what keeps the spread sticky.
    after = assign(partitions, [*workers, newcomer], before)
    share = math.ceil(partitions / (len(workers) + 1))
    assert moved(before, after) <= share + 3


@pytest.mark.fuzz
def test_a_join_among_more_workers_than_partitions_moves_at_most_one_partition() -> None:
    rnd = random.Random(seed(3))
    worst = 0
    for _ in range(200):
        workers = [f"host-{rnd.getrandbits(40):x}" for _ in range(11)]
        before = assign(6, workers[:-1])
        worst = max(worst, moved(before, assign(6, workers, before)))
    assert worst <= 1


# --- lease SQL ---------------------------------------------------------------------------------


async def epoch_of(acquiring: Awaitable[leases.Acquired | None]) -> int:
    acquired = await acquiring
    assert acquired is not None, "the lease was not acquired"
    return acquired.epoch


async def test_ensure_partitions_creates_free_leases_once(
    db: asyncpg.Pool, settings: Settings
) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, settings.partitions)
        assert await epoch_of(leases.acquire(conn, 0, "a", 5)) == 1
        await leases.ensure_partitions(conn, settings.partitions)  # idempotent: keeps epochs
        rows = await leases.all_leases(conn)
    assert [row["partition"] for row in rows] == list(range(settings.partitions))
    assert [(row["owner"], row["epoch"]) for row in rows] == [("a", 1)] + [(None, 0)] * (
        settings.partitions - 1
    )


async def test_a_live_lease_cannot_be_acquired_by_another_worker(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 2)
        assert await epoch_of(leases.acquire(conn, 0, "a", 30)) == 1
        assert await leases.acquire(conn, 0, "b", 30) is None
        row = await conn.fetchrow("SELECT owner, epoch FROM partition_leases WHERE partition = 0")
        assert row is not None
    assert (row["owner"], row["epoch"]) == ("a", 1)


async def test_every_acquisition_raises_the_epoch(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        assert await epoch_of(leases.acquire(conn, 0, "a", 30)) == 1
        # A restarted incarnation of the same worker id fences out the old one.
        assert await epoch_of(leases.acquire(conn, 0, "a", 30)) == 2
        await leases.release(conn, 0, "a", 2)
        assert await epoch_of(leases.acquire(conn, 0, "b", 30)) == 3
        await conn.execute("UPDATE partition_leases SET expires_at = now() - interval '1 second'")
        assert await epoch_of(leases.acquire(conn, 0, "c", 30)) == 4


async def test_acquire_reports_whose_lease_it_took_over(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        assert await leases.acquire(conn, 0, "a", 30) == leases.Acquired(1, None)
        await conn.execute("UPDATE partition_leases SET expires_at = now() - interval '1 second'")
        assert await leases.acquire(conn, 0, "b", 30) == leases.Acquired(2, "a")
        await leases.release(conn, 0, "b", 2)
        assert await leases.acquire(conn, 0, "c", 30) == leases.Acquired(3, None)


async def test_release_frees_the_lease_but_keeps_the_epoch(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        epoch = await epoch_of(leases.acquire(conn, 0, "a", 30))
        assert epoch == 1
        await leases.release(conn, 0, "b", epoch)  # not the owner: nothing happens
        await leases.release(conn, 0, "a", epoch + 1)  # stale epoch: nothing happens
        row = await conn.fetchrow("SELECT owner, epoch FROM partition_leases")
        assert row is not None
        assert (row["owner"], row["epoch"]) == ("a", 1)
        await leases.release(conn, 0, "a", epoch)
        row = await conn.fetchrow("SELECT owner, epoch, expires_at FROM partition_leases")
        assert row is not None
        assert (row["owner"], row["epoch"], row["expires_at"]) == (None, 1, None)


async def test_renew_extends_only_the_leases_still_held_at_their_epoch(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 3)
        held = {p: await epoch_of(leases.acquire(conn, p, "a", 1)) for p in range(3)}
        assert all(epoch == 1 for epoch in held.values())
        # Partition 1 expires and goes to b; partition 2 is asked for at a wrong epoch.
        await conn.execute(
            "UPDATE partition_leases SET expires_at = now() - interval '1 second' "
            "WHERE partition = 1"
        )
        assert await epoch_of(leases.acquire(conn, 1, "b", 30)) == 2
        before = await conn.fetchval("SELECT expires_at FROM partition_leases WHERE partition = 0")
        renewal = await leases.renew(conn, "a", {0: 1, 1: 1, 2: 7}, 60)
        assert renewal == leases.Renewal(renewed={0}, skipped=set(), lost={1, 2})
        rows = {row["partition"]: row for row in await conn.fetch("SELECT * FROM partition_leases")}
    assert rows[0]["expires_at"] > before
    assert rows[0]["expires_at"] > datetime.now(UTC).astimezone(rows[0]["expires_at"].tzinfo)
    assert (rows[1]["owner"], rows[1]["epoch"]) == ("b", 2)


async def test_a_commit_in_flight_does_not_hold_up_its_leases_renewal(db: asyncpg.Pool) -> None:
    """A commit holds its lease row (the fence, FOR KEY SHARE) for as long as it runs; renewing
    that lease meanwhile neither waits for it nor fails."""
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 2)
        held = {p: await epoch_of(leases.acquire(conn, p, "a", 30)) for p in range(2)}
    async with db.acquire() as committing, committing.transaction():
        await leases.check_fence(committing, 0, "a", held[0])
        async with db.acquire() as conn:
            renewal = await asyncio.wait_for(leases.renew(conn, "a", held, 30), 2)
    assert renewal == leases.Renewal(renewed={0, 1}, skipped=set(), lost=set())


async def test_a_lease_locked_by_a_takeover_attempt_is_skipped_not_waited_for_nor_lost(
    db: asyncpg.Pool,
) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 2)
        held = {p: await epoch_of(leases.acquire(conn, p, "a", 30)) for p in range(2)}
    async with db.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM partition_leases WHERE partition = 1 FOR UPDATE")
        async with db.acquire() as conn:
            renewal = await asyncio.wait_for(leases.renew(conn, "a", held, 30), 2)
    assert renewal == leases.Renewal(renewed={0}, skipped={1}, lost=set())


async def test_the_fence_passes_only_for_the_current_owner_and_epoch(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        await leases.acquire(conn, 0, "a", 30)
        async with conn.transaction():
            await leases.check_fence(conn, 0, "a", 1)
        for owner, epoch in (("a", 2), ("b", 1)):
            with pytest.raises(LeaseLost):
                async with conn.transaction():
                    await leases.check_fence(conn, 0, owner, epoch)


# --- fencing of commits ------------------------------------------------------------------------


def batch_for(event_id: str, *quantities: int) -> list[PurchaseRequested]:
    return [
        PurchaseRequested(
            purchase_id=uuid4(),
            event_id=UUID(event_id),
            customer_id=f"customer-{n}",
            quantity=quantity,
            accepted_at=datetime.now(UTC),
        )
        for n, quantity in enumerate(quantities)
    ]


async def event_state(db: asyncpg.Pool, event_id: str) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT available_tickets, version FROM events WHERE id = $1", UUID(event_id)
    )
    assert row is not None
    return row["available_tickets"], row["version"]


async def take_over(db: asyncpg.Pool, partition: int, new_owner: str) -> int:
    """Let the current lease expire, then acquire it as `new_owner`; return the new epoch."""
    async with db.acquire() as conn:
        await conn.execute(
            "UPDATE partition_leases SET expires_at = now() - interval '1 second' "
            "WHERE partition = $1",
            partition,
        )
        acquired = await leases.acquire(conn, partition, new_owner, 30)
    assert acquired is not None
    return acquired.epoch


async def test_a_commit_under_a_lease_taken_over_raises_lease_lost_and_writes_nothing(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    event = await create_event(api, total_tickets=10)
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        epoch_a = await epoch_of(leases.acquire(conn, 0, "worker-a", 30))
    old = Lease(partition=0, owner="worker-a", epoch=epoch_a)
    before = await event_state(db, event["id"])

    epoch_b = await take_over(db, 0, "worker-b")
    assert epoch_b == epoch_a + 1

    batch = batch_for(event["id"], 2, 3)
    with pytest.raises(LeaseLost):
        await apply_batch(db, old, batch)
    assert await db.fetchval("SELECT count(*) FROM purchases") == 0
    assert await event_state(db, event["id"]) == before

    # The new owner commits the very same batch, once.
    result = await apply_batch(db, Lease(0, "worker-b", epoch_b), batch)
    assert result.count(PurchaseStatus.CONFIRMED) == 2
    assert await event_state(db, event["id"]) == (5, before[1] + 1)
    # And the old owner still cannot, even for purchases already decided.
    with pytest.raises(LeaseLost):
        await apply_batch(db, old, batch)
    again = await apply_batch(db, Lease(0, "worker-b", epoch_b), batch)
    assert again.duplicates == 2
    assert again.decisions == []
    assert await event_state(db, event["id"]) == (5, before[1] + 1)
    await assert_no_oversell(db)


async def test_a_worker_that_reacquires_after_a_takeover_gets_a_new_epoch_and_the_old_one_is_dead(
    api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """A -> B -> A again: A's first lease (epoch 1) stays fenced out although A owns the
    partition again, under epoch 3."""
    event = await create_event(api, total_tickets=4)
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        await leases.acquire(conn, 0, "worker-a", 30)
    await take_over(db, 0, "worker-b")
    epoch = await take_over(db, 0, "worker-a")
    assert epoch == 3
    with pytest.raises(LeaseLost):
        await apply_batch(db, Lease(0, "worker-a", 1), batch_for(event["id"], 1))
    result = await apply_batch(db, Lease(0, "worker-a", 3), batch_for(event["id"], 1))
    assert result.count(PurchaseStatus.CONFIRMED) == 1
    await assert_no_oversell(db)


async def test_a_takeover_never_overtakes_a_commit_that_already_passed_the_fence(
    db: asyncpg.Pool,
) -> None:
    """The fence holds the lease row FOR SHARE: while a commit that passed it is in flight, the
    expired lease is "not free yet" (the acquire skips the locked row at once instead of
    blocking the new owner's loop); once that commit ends, the takeover succeeds."""
    async with db.acquire() as conn:
        await leases.ensure_partitions(conn, 1)
        await leases.acquire(conn, 0, "worker-a", 30)
        await conn.execute("UPDATE partition_leases SET expires_at = now() - interval '1 second'")
    async with db.acquire() as old_owner:
        transaction = old_owner.transaction()
        await transaction.start()
        await leases.check_fence(old_owner, 0, "worker-a", 1)

        async def acquire_as_b() -> leases.Acquired | None:
            async with db.acquire() as conn:
                return await leases.acquire(conn, 0, "worker-b", 30)

        during = await asyncio.wait_for(acquire_as_b(), 2)
        assert during is None, "the lease was taken over under a commit in flight"
        await transaction.commit()
        assert await asyncio.wait_for(acquire_as_b(), 10) == leases.Acquired(2, "worker-a")
