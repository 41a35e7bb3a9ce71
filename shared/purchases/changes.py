"""Purchases whose status changed, as the worker announces them and the API hears them.

The worker sends `NOTIFY purchases_changed, '<id>,<id>,…'` inside each commit's transaction, so a
notification means a committed change (PostgreSQL delivers it on commit, and drops it on
rollback). Payloads are bounded (PostgreSQL refuses one of 8,000 bytes or more): a batch's ids
are split over as many notifications as it takes.

The API keeps one LISTEN connection per process (`StatusWaiters`), reads the purchases that
requests wait on in one query, and wakes those requests with them. A notification carries no
state, so one that arrives late or twice is harmless, and one that is missed (the listener
reconnecting) is made up for by waking everybody, to read for themselves, once it is back.
"""

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar
from uuid import UUID

import asyncpg

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "purchases_changed"
LISTENER_NAME = "ticketing-status-listener"  # its application_name, for operators
MAX_PAYLOAD_BYTES = 7_900  # PostgreSQL's limit is 8,000 bytes
_ID_BYTES = 37  # 36 characters and a comma
# How often the listener proves its connection alive, and waits before reconnecting.
CHECK_INTERVAL_S = 5.0
RECONNECT_S = 0.5


def payloads(purchase_ids: Sequence[UUID]) -> list[str]:
    """The notifications announcing `purchase_ids`, each under PostgreSQL's payload limit."""
    per_payload = MAX_PAYLOAD_BYTES // _ID_BYTES
    return [
        ",".join(str(purchase_id) for purchase_id in purchase_ids[start : start + per_payload])
        for start in range(0, len(purchase_ids), per_payload)
    ]


def parse(payload: str) -> list[UUID]:
    ids = []
    for part in payload.split(","):
        with contextlib.suppress(ValueError):
            ids.append(UUID(part))
    return ids


class Timeouts:
    """When held waits time out, kept on one timer of the loop's rather than one each: thousands
    of waits are held at once, and a timer of uvloop's (a libuv timer and its handle) costs
    about 0.5 KB where an entry here costs about 0.1 KB.

    A wait that ends early leaves its entry behind, cheaper than finding it; once most entries
    are left behind they are swept out together, as asyncio's own loop does with cancelled
    timers, so what is kept follows the waits held, not the requests served."""

    # uvloop's timers are in milliseconds and may fire up to one early.
    _RESOLUTION_S = 0.001
    _SWEEP_MIN = 512

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Waiter[Any]]] = []
        self._order = itertools.count()
        self._left = 0  # entries of waits that ended early
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._due)

    def add(self, when: float, waiter: "Waiter[Any]") -> None:
        """Time `waiter` out at `when` (the loop's time), unless its wait has ended before."""
        heapq.heappush(self._due, (when, next(self._order), waiter))
        if self._due[0][0] < self._timer_at:
            self._arm(self._due[0][0])

    def left_behind(self) -> None:
        """A wait ended before its time: its entry no longer times anything out."""
        self._left += 1
        if self._left > self._SWEEP_MIN and 2 * self._left > len(self._due):
            self._due = [entry for entry in self._due if entry[2].waits_until(entry[0])]
            heapq.heapify(self._due)
            self._left = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = asyncio.get_running_loop().time() + self._RESOLUTION_S
        try:
            while self._due and self._due[0][0] <= now:
                when, _, waiter = heapq.heappop(self._due)
                if waiter.waits_until(when):
                    waiter.time_out()
                else:
                    self._left -= 1
        finally:
            if self._due:
                self._arm(self._due[0][0])


class Waiter(Generic[T]):
    """One waiting request: woken when its purchase may have changed, with the purchase as
    read for it (None: read it yourself).

    Thousands are held at once, so it is kept small: a flag, and a future and a deadline only
    while it waits (an asyncio.Event would carry a deque of its own, and asyncio.timeout() an
    object and a context per wait)."""

    __slots__ = ("_deadline", "_future", "_timeouts", "_woken", "latest")

    def __init__(self, timeouts: Timeouts) -> None:
        self._timeouts = timeouts
        self._woken = False
        self._future: asyncio.Future[None] | None = None
        self._deadline: float | None = None
        self.latest: T | None = None

    def wake(self, latest: T | None = None) -> None:
        self.latest = latest
        self._woken = True
        self._settle()

    @property
    def woken(self) -> bool:
        return self._woken

    def wait(self, timeout_s: float) -> "asyncio.Future[None]":
        """Done once woken (at once if it was), or once `timeout_s` passed. A future rather
        than a coroutine: the coroutine's frame would be kept by every held request."""
        self._settle()  # a wait given up (its task cancelled) is over
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._woken:
            future.set_result(None)
        else:
            self._future = future
            self._deadline = loop.time() + timeout_s
            self._timeouts.add(self._deadline, self)
        return future

    def waits_until(self, deadline: float) -> bool:
        """Whether a wait is on, and ends at `deadline`."""
        return deadline == self._deadline

    def time_out(self) -> None:
        """The wait's deadline has come (the wait is over, and so is its entry)."""
        self._deadline = None
        self._settle()

    def close(self) -> None:
        """Nobody waits on it any longer: drop its future and what it was woken with."""
        self._settle()
        self.latest = None

    def _settle(self) -> None:
        if self._deadline is not None:
            self._deadline = None
            self._timeouts.left_behind()
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)

    def take(self) -> T | None:
        """The purchase it was woken with, once; and be ready to wait again."""
        latest, self.latest = self.latest, None
        self._woken = False
        return latest


Fetch = Callable[[list[UUID]], Awaitable[dict[UUID, T]]]


class StatusWaiters(Generic[T]):
    """Requests waiting for purchases to change, and the one LISTEN connection that wakes them.

    Waiting costs memory only, never a database read. When a notification names purchases that
    requests wait on, `fetch` reads them all in one query and each request is woken with its
    purchase: one read per commit, not one per waiter. Past `max_waiters` a request is not held
    (`add` gives None) and is answered at once."""

    def __init__(self, database_url: str, *, max_waiters: int) -> None:
        self._url = database_url
        self.max_waiters = max_waiters
        # A list per purchase rather than a set: nearly always one waiter, and a set costs 216 B.
        self._waiting: dict[UUID, list[Waiter[T]]] = {}
        self._timeouts = Timeouts()
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._fetch: Fetch[T] | None = None
        self._to_fetch: set[UUID] = set()
        self._fetching: asyncio.Task[None] | None = None
        # Set once the process is stopping: nobody is held any longer (see release).
        self.released = False
        self._pauses: set[Waiter[T]] = set()  # see pause

    def fetch_with(self, fetch: Fetch[T]) -> None:
        self._fetch = fetch

    @property
    def held(self) -> int:
        """How many waiters are held now."""
        return self._count

    @property
    def listening(self) -> bool:
        """Whether notifications are being heard; if not, waiters should poll."""
        return self._up.is_set()

    async def start(self, *, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._listen(), name="status-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        if not self.listening:
            log.warning("status listener not connected yet; waiting requests poll meanwhile")

    async def close(self) -> None:
        for task in (self._task, self._fetching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._wake_all()
        self._end_pauses()  # their timer is stopped below: nothing else would end them
        self._timeouts.close()

    def release(self) -> None:
        """The process is stopping: wake every waiter, for good, and hold no new one, so that
        held requests answer now rather than be cut at the server's graceful timeout."""
        self.released = True
        self._wake_all()
        self._end_pauses()

    def pause(self, seconds: float) -> "asyncio.Future[None]":
        """Done after `seconds`, or as soon as the process is stopping (at once if it is): how a
        request that holds no waiter (past the bound, or the database away) waits between two
        reads without being cut at the server's graceful timeout. A future on the timer the
        waiters share, as `Waiter.wait` is, rather than a coroutine and a timer of its own."""
        waiter: Waiter[T] = Waiter(self._timeouts)
        if self.released:
            waiter.wake()
        else:
            self._pauses.add(waiter)
        paused = waiter.wait(seconds)
        paused.add_done_callback(lambda _: self._pauses.discard(waiter))
        return paused

    def add(self, purchase_id: UUID) -> Waiter[T] | None:
        """A waiter woken whenever `purchase_id` may have changed, until `remove`d (None: too
        many waiters, or the process is stopping). Add it before reading the purchase, so that
        no change between the read and the wait is lost."""
        if self._count >= self.max_waiters or self.released:
            return None
        waiter: Waiter[T] = Waiter(self._timeouts)
        self._waiting.setdefault(purchase_id, []).append(waiter)
        self._count += 1
        return waiter

    def remove(self, purchase_id: UUID, waiter: Waiter[T]) -> None:
        waiter.close()
        self._count -= 1
        waiters = self._waiting.get(purchase_id)
        if waiters is not None:
            with contextlib.suppress(ValueError):  # removed twice
                waiters.remove(waiter)
            if not waiters:
                del self._waiting[purchase_id]

    def changed(self, purchase_ids: Sequence[UUID]) -> None:
        """These purchases may have changed: read those waited on (in one query), wake their
        waiters with them."""
        wanted = [p for p in purchase_ids if p in self._waiting]
        if not wanted:
            return
        if self._fetch is None:
            for purchase_id in wanted:
                self._wake(purchase_id, None)
            return
        self._to_fetch.update(wanted)
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch_and_wake())

    async def _fetch_and_wake(self) -> None:
        assert self._fetch is not None
        await asyncio.sleep(0)  # the rest of this commit's notifications join the read
        while self._to_fetch:
            ids, self._to_fetch = list(self._to_fetch), set()
            try:
                found = await self._fetch(ids)
            except Exception as exc:  # the database is away: each waiter reads for itself
                log.warning("reading %d changed purchases failed: %r", len(ids), exc)
                found = {}
            for purchase_id in ids:
                self._wake(purchase_id, found.get(purchase_id))

    def _wake(self, purchase_id: UUID, latest: T | None) -> None:
        for waiter in self._waiting.get(purchase_id, ()):
            waiter.wake(latest)

    def _wake_all(self) -> None:
        for waiters in self._waiting.values():
            for waiter in waiters:
                waiter.wake()

    def _end_pauses(self) -> None:
        # A pause ends only once stopping: a listener's reconnect (which wakes the waiters) has
        # nothing to tell a request that reads for itself.
        for waiter in list(self._pauses):
            waiter.wake()

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.changed(parse(str(payload)))

    async def _listen(self) -> None:
        """Keep one LISTEN connection up for good; after each reconnect, wake every waiter so it
        reads its purchase again (what committed while nobody listened is not announced twice)."""
        while True:
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=CHECK_INTERVAL_S,
                    server_settings={"application_name": LISTENER_NAME},
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, timed out: try again shortly
                log.warning("status listener cannot connect: %r; retrying", exc)
            else:
                await self._session(conn)
            await asyncio.sleep(RECONNECT_S)

    async def _session(self, conn: asyncpg.Connection) -> None:
        """Listen on `conn` until it is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        try:
            await conn.add_listener(CHANNEL, self._on_notification)
            self._up.set()
            self._wake_all()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), CHECK_INTERVAL_S)
                if not lost.is_set():  # a half-open connection hears nothing: prove it alive
                    await conn.fetchval("SELECT 1", timeout=CHECK_INTERVAL_S)
            # Ended by the server (a terminated backend, a restart): said as any other loss.
            log.warning("status listener connection lost: terminated; reconnecting")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # lost, timed out: reconnect
            log.warning("status listener connection lost: %r; reconnecting", exc)
        finally:
            self._up.clear()
            self._wake_all()  # waiters poll until the listener is back
            if not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1)
