"""A waiter: woken with what was read for it, or timed out; nothing left behind once removed."""

import asyncio
import time
from uuid import uuid4

from shared.purchases.changes import StatusWaiters, Waiter


async def test_a_wait_ends_when_woken_with_what_was_read() -> None:
    waiter: Waiter[str] = Waiter()
    asyncio.get_running_loop().call_later(0.05, waiter.wake, "confirmed")
    started = time.monotonic()
    await waiter.wait(10)
    assert time.monotonic() - started < 1
    assert waiter.woken
    assert waiter.take() == "confirmed"
    assert not waiter.woken, "taking readies it to wait again"


async def test_a_wake_before_the_wait_is_not_lost() -> None:
    waiter: Waiter[str] = Waiter()
    waiter.wake()
    started = time.monotonic()
    await waiter.wait(10)
    assert time.monotonic() - started < 0.5
    assert waiter.woken
    assert waiter.take() is None


async def test_a_wait_ends_at_its_timeout_unwoken() -> None:
    waiter: Waiter[str] = Waiter()
    started = time.monotonic()
    await waiter.wait(0.1)
    assert 0.09 <= time.monotonic() - started < 2
    assert not waiter.woken


async def test_a_removed_waiter_leaves_no_timer_and_frees_its_place() -> None:
    waiters: StatusWaiters[str] = StatusWaiters("postgresql://unused", max_waiters=1)
    purchase_id = uuid4()
    waiter = waiters.add(purchase_id)
    assert waiter is not None
    assert waiters.add(uuid4()) is None, "past its bound, a process holds no more waiters"
    waiting = asyncio.ensure_future(waiter.wait(30))
    await asyncio.sleep(0)
    waiting.cancel()  # the client went away
    waiters.remove(purchase_id, waiter)
    assert waiter._timer is None
    assert waiter._future is None
    assert waiters.held == 0
    assert waiters.add(purchase_id) is not None
