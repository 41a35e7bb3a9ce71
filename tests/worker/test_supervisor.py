"""The worker's own bookkeeping of its leases, where two of its tasks find the same thing."""

import asyncio
import time

from prometheus_client import REGISTRY

from shared.settings import Settings
from worker.supervisor import Worker


class SlowToStop:
    """A partition consumer whose abort takes a while, as one that closes its channel does."""

    applied = 0

    def __init__(self) -> None:
        self.aborts = 0

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
