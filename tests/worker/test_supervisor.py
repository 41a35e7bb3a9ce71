"""The worker's own bookkeeping of its leases, where two of its tasks find the same thing."""

import asyncio
import time

from prometheus_client import REGISTRY

from shared.settings import Settings
from worker.supervisor import Worker


class SlowToStop:
    """A partition consumer whose abort takes a while, as one that closes its channel does."""

    applied = 0

    def __init__(self, *, broken: bool = False, lost_lease: bool = False) -> None:
        self.aborts = 0
        self.broken = broken
        self.lost_lease = lost_lease

    async def abort(self) -> None:
        self.aborts += 1
        await asyncio.sleep(0.05)


def lost_leases() -> float:
    return REGISTRY.get_sample_value("ticketing_worker_leases_lost_total") or 0.0


async def test_a_lease_the_watchdog_and_a_tick_both_find_lost_is_given_up_once(
    settings: Settings,
) -> None:
    """The watchdog gives up two unproven leases one after the other; while it waits for the
    first consumer to stop, a tick finds the second taken over. Each lease is given up and
    counted once, and nothing fails on the one the other took first."""
    worker = Worker(settings)
    consumers = {1: SlowToStop(), 3: SlowToStop()}
    worker._held = {1: 5, 3: 7}
    worker._consumers = dict(consumers)  # type: ignore[arg-type]
    long_ago = time.monotonic() - 10 * settings.lease_ttl_s
    worker._extended = {1: long_ago, 3: long_ago}
    before = lost_leases()

    async def tick_finds_3_taken_over() -> None:
        await asyncio.sleep(0.01)  # within the watchdog's wait for partition 1
        await worker._give_up(3, "lease taken over")

    await asyncio.gather(worker._give_up_unproven(), tick_finds_3_taken_over())

    assert worker._held == {}
    assert worker._consumers == {}
    assert [consumers[1].aborts, consumers[3].aborts] == [1, 1]
    assert lost_leases() - before == 2
    assert worker._giving_up == set()


async def test_a_consumer_that_lost_its_lease_at_commit_while_the_watchdog_gives_it_up(
    settings: Settings,
) -> None:
    """A consumer whose commit found its lease gone is retired by the tick, while the watchdog
    finds the same lease unproven: one of them stops it and counts the loss, and neither fails
    on what the other took first, whichever goes first."""
    for watchdog_first in (True, False):
        worker = Worker(settings)
        consumer = SlowToStop(broken=True, lost_lease=True)
        worker._held = {2: 9}
        worker._consumers = {2: consumer}  # type: ignore[dict-item]
        worker._extended = {2: time.monotonic() - 10 * settings.lease_ttl_s}
        before = lost_leases()

        async def later(step: object) -> None:
            await asyncio.sleep(0.01)
            await step  # type: ignore[misc]

        tick = worker._replace_broken(None)  # type: ignore[arg-type]
        watchdog = worker._give_up_unproven()
        first, second = (watchdog, tick) if watchdog_first else (tick, watchdog)
        await asyncio.gather(first, later(second))

        assert (worker._held, worker._consumers, worker._giving_up) == ({}, {}, set())
        assert consumer.aborts == 1, watchdog_first
        assert lost_leases() - before == 1, watchdog_first
