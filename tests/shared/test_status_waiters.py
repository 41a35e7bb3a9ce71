"""A waiter: woken with what was read for it, or timed out; nothing left behind once removed.
A follower: no wake-up lost, even when the read it calls for fails; none held past a stop."""

import asyncio
import time
from collections.abc import Iterator
from typing import cast
from uuid import UUID, uuid4

from shared.errors import ServiceUnavailable
from shared.purchases.changes import StatusWaiters, Timeouts, Waiter
from shared.purchases.models import Purchase, PurchaseStatus
from shared.purchases.service import PurchaseService, StatusFollower


async def test_a_wait_ends_when_woken_with_what_was_read() -> None:
    waiter: Waiter[str] = Waiter(Timeouts())
    asyncio.get_running_loop().call_later(0.05, waiter.wake, "confirmed")
    started = time.monotonic()
    await waiter.wait(10)
    assert time.monotonic() - started < 1
    assert waiter.woken
    assert waiter.take() == "confirmed"
    assert not waiter.woken, "taking readies it to wait again"


async def test_a_wake_before_the_wait_is_not_lost() -> None:
    waiter: Waiter[str] = Waiter(Timeouts())
    waiter.wake()
    started = time.monotonic()
    await waiter.wait(10)
    assert time.monotonic() - started < 0.5
    assert waiter.woken
    assert waiter.take() is None


async def test_a_wait_ends_at_its_timeout_unwoken() -> None:
    waiter: Waiter[str] = Waiter(Timeouts())
    started = time.monotonic()
    await waiter.wait(0.1)
    assert 0.09 <= time.monotonic() - started < 2
    assert not waiter.woken


async def test_waits_time_out_each_at_its_own_time() -> None:
    timeouts = Timeouts()
    waiters: list[Waiter[str]] = [Waiter(timeouts) for _ in range(3)]
    ended: list[tuple[float, float]] = []
    started = time.monotonic()

    async def wait(waiter: Waiter[str], timeout_s: float) -> None:
        await waiter.wait(timeout_s)
        ended.append((timeout_s, time.monotonic() - started))

    await asyncio.gather(*(wait(w, t) for w, t in zip(waiters, (0.3, 0.1, 0.2), strict=True)))
    assert [timeout_s for timeout_s, _ in ended] == [0.1, 0.2, 0.3]
    for timeout_s, after in ended:
        assert timeout_s - 0.005 <= after < timeout_s + 0.5
    assert len(timeouts) == 0, "nothing is left once every wait has timed out"


async def test_a_wait_is_not_cut_short_by_the_timeout_of_an_earlier_one() -> None:
    timeouts = Timeouts()
    waiter: Waiter[str] = Waiter(timeouts)
    first = waiter.wait(0.1)
    waiter.wake("held")
    await first
    assert waiter.take() == "held"
    started = time.monotonic()
    await waiter.wait(0.4)  # the first wait's entry comes due meanwhile
    assert time.monotonic() - started >= 0.39
    assert not waiter.woken


async def test_waits_ended_early_are_swept_out_not_kept_until_their_time() -> None:
    """A flash sale's long-polls mostly end early, at their decision: what is kept must follow
    the waits held, not the requests served in the last 30 s."""
    timeouts = Timeouts()
    held: Waiter[str] = Waiter(timeouts)
    held_wait = held.wait(30)
    for _ in range(10_000):
        answered: Waiter[str] = Waiter(timeouts)
        waiting = answered.wait(30)
        answered.wake("confirmed")
        assert waiting.done()
        answered.close()
    assert len(timeouts) <= 2 * Timeouts._SWEEP_MIN + 2
    assert not held_wait.done(), "the sweep keeps the waits still held"
    started = time.monotonic()
    await held.wait(0.1)
    assert time.monotonic() - started >= 0.09


async def test_a_removed_waiter_ends_its_wait_and_frees_its_place() -> None:
    waiters: StatusWaiters[str] = StatusWaiters("postgresql://unused", max_waiters=1)
    purchase_id = uuid4()
    waiter = waiters.add(purchase_id)
    assert waiter is not None
    assert waiters.add(uuid4()) is None, "past its bound, a process holds no more waiters"
    waiting = asyncio.ensure_future(waiter.wait(30))
    await asyncio.sleep(0)
    waiting.cancel()  # the client went away
    waiters.remove(purchase_id, waiter)
    assert waiter._future is None
    assert waiter._deadline is None, "its timeout's entry, when due, ends nothing"
    assert waiters.held == 0
    assert waiters.add(purchase_id) is not None


async def test_a_pause_ends_at_its_time_or_as_soon_as_the_process_stops() -> None:
    """A request past the bound of waiters pauses between two reads: never past a stop."""
    waiters: StatusWaiters[str] = StatusWaiters("postgresql://unused", max_waiters=0)
    started = time.monotonic()
    await waiters.pause(0.1)
    assert 0.09 <= time.monotonic() - started < 2

    pausing = waiters.pause(30)
    asyncio.get_running_loop().call_later(0.1, waiters.release)
    started = time.monotonic()
    await pausing
    assert time.monotonic() - started < 2, "paused on after the process began to stop"
    await asyncio.sleep(0)  # its done callback
    assert not waiters._pauses, "an ended pause is not kept"

    started = time.monotonic()
    await waiters.pause(30)
    assert time.monotonic() - started < 0.5, "once stopping, a pause ends at once"


class ScriptedReads:
    """The service's reads of one purchase, as scripted: a status, or an outage."""

    def __init__(self, *outcomes: PurchaseStatus | Exception) -> None:
        self._outcomes: Iterator[PurchaseStatus | Exception] = iter(outcomes)
        self.reads = 0

    async def status(self, purchase_id: UUID) -> Purchase:
        self.reads += 1
        outcome = next(self._outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return Purchase(
            purchase_id=purchase_id,
            event_id=None,
            customer_id=None,
            quantity=None,
            status=outcome,
            accepted_at=None,
        )


def listening_waiters() -> StatusWaiters[Purchase]:
    waiters: StatusWaiters[Purchase] = StatusWaiters("postgresql://unused", max_waiters=10)
    waiters._up.set()  # as if its LISTEN connection were up
    return waiters


PENDING = frozenset({PurchaseStatus.PENDING.value})


async def test_a_wake_up_whose_read_fails_is_read_again_not_lost() -> None:
    """Woken without the purchase (the listener's read failed too), the follower's own read
    fails: the next try must read again, not take the status it saw before as current."""
    waiters = listening_waiters()
    purchase_id = uuid4()
    reads = ScriptedReads(
        PurchaseStatus.PENDING, ServiceUnavailable("pool exhausted"), PurchaseStatus.HELD
    )
    follower = StatusFollower(cast(PurchaseService, reads), waiters, purchase_id)
    with follower:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, waiters._wake, purchase_id, None)
        started = time.monotonic()
        changed = await follower.change(unlike=PENDING, wait_s=10)
    assert changed is not None
    assert changed.status == PurchaseStatus.HELD
    assert time.monotonic() - started < 3, "the change was seen only at the deadline"
    assert reads.reads == 3


async def test_a_stop_during_an_outage_is_not_waited_through() -> None:
    waiters = listening_waiters()
    purchase_id = uuid4()
    reads = ScriptedReads(
        ServiceUnavailable("database away"), PurchaseStatus.PENDING, PurchaseStatus.PENDING
    )
    follower = StatusFollower(cast(PurchaseService, reads), waiters, purchase_id)
    with follower:
        asyncio.get_running_loop().call_later(0.3, waiters.release)
        started = time.monotonic()
        changed = await follower.change(unlike=PENDING, wait_s=10)
    assert changed is None, "nothing changed: the caller answers with the status as it is"
    assert time.monotonic() - started < 2, "held on after the process began to stop"
