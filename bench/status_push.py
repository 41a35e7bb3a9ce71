"""Status delivery measured: what buyers cost while they wait for their purchase, and how soon
they hear of it.

- `requests_per_purchase`: buyers purchase, then follow the status until it is decided, either by
  plain polling that honours Retry-After or by long-poll; status requests per purchase.
- `hold_waiters`: `waiters` purchases queued with no worker running, each followed by its own
  connection (long-poll or server-sent events) held open on one API process; then a worker
  decides them all. Latency runs from the decision's commit (when a listener of the worker's
  notifications hears of it: PostgreSQL delivers them at commit) to the client reading the answer.
"""

import asyncio
import contextlib
import gc
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from shared.purchases.changes import CHANNEL

PENDING = b'"status":"pending"'
# How long every held waiter may take to get its answer once deciding starts (a long-poll's own
# limit is 30 s).
ANSWERED_WITHIN_S = 120.0


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its response (Content-Length or a
    server-sent event stream), nothing more.

    Reads what arrived in one go and parses it from a buffer: with 10,000 connections answered
    within a second, a read per header line made this client, not the server, what the latency
    measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: bytes):
        self.reader, self.writer, self.host = reader, writer, host
        self._buffer = b""

    async def _more(self) -> None:
        chunk = await self.reader.read(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        self._buffer += chunk

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        """The status and headers of the next response."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            await self._more()
        lines = self._buffer[:end].split(b"\r\n")
        self._buffer = self._buffer[end + 4 :]
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(b" ", 2)[1]), headers

    async def line(self) -> bytes:
        """The next line of a streamed body, without its end."""
        while (end := self._buffer.find(b"\n")) < 0:
            await self._more()
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        return line.rstrip(b"\r")

    @classmethod
    async def open(cls, base_url: str) -> "Connection":
        parts = urlsplit(base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}".encode())

    def send(self, method: str, path: str, body: bytes = b"", headers: bytes = b"") -> None:
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: ".encode()
            + self.host
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n"
            + headers
            + b"\r\n"
            + body
        )

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        status, headers = await self.head()
        length = int(headers.get(b"content-length", b"0"))
        while len(self._buffer) < length:
            await self._more()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return status, headers, body

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        self.send(method, path, body, headers)
        return await self.response()

    def close(self) -> None:
        self.writer.close()


class CommitClock:
    """When each purchase's decision was committed: the time a listener hears the worker's
    notification naming it (PostgreSQL delivers a NOTIFY when its transaction commits). It
    listens from a thread with an event loop of its own, so that the clients' busy loop does not
    delay the timestamps."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self.heard: dict[str, float] = {}
        self._listening = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    def __enter__(self) -> "CommitClock":
        self._thread.start()
        if not self._listening.wait(10):
            raise RuntimeError("the commit clock could not listen")
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _listen(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        conn = await asyncpg.connect(self._url)
        try:
            await conn.add_listener(CHANNEL, self._heard)
            self._listening.set()
            await self._stop.wait()
        finally:
            await conn.close()

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        now = time.time()
        for purchase_id in str(payload).split(","):
            self.heard.setdefault(purchase_id, now)


class ReleaseClock:
    """The commit clock of the answer floor (bench/answer_floor.py): every decision "committed"
    when that server began answering."""

    def __init__(self, base_url: str, purchase_ids: list[str]) -> None:
        self._base_url = base_url
        self._ids = purchase_ids
        self.heard: dict[str, float] = {}

    async def release(self) -> None:
        conn = await Connection.open(self._base_url)
        try:
            status, _, body = await conn.request("POST", "/release")
        finally:
            conn.close()
        if status != 200:
            raise RuntimeError(f"the answer floor refused the release: {status}")
        self.heard = dict.fromkeys(self._ids, float(body))


def purchase_body(i: int) -> bytes:
    return orjson.dumps({"customer_id": f"waiter-{i}", "quantity": 1})


async def requests_per_purchase(
    base_url: str, event_id: str, *, purchases: int, buyers: int, long_poll: bool
) -> dict[str, Any]:
    """Buyers purchase, then follow the status until decided: by polling (honouring
    Retry-After) or by long-poll (`?wait=25`). Status requests per purchase until decided."""
    numbers = iter(range(purchases))
    polls: Counter[str] = Counter()
    latencies: list[float] = []

    async def buyer() -> None:
        conn = await Connection.open(base_url)
        try:
            for i in numbers:
                status, headers, body = await conn.request(
                    "POST", f"/events/{event_id}/tickets/purchase", purchase_body(i)
                )
                if status != 202:
                    polls[f"purchase {status}"] += 1
                    continue
                accepted = time.perf_counter()
                url = orjson.loads(body)["status_url"]
                if not long_poll:
                    await asyncio.sleep(float(headers.get(b"retry-after", b"1")))
                while True:
                    status, headers, body = await conn.request(
                        "GET", url + ("?wait=25" if long_poll else "")
                    )
                    polls["status requests"] += 1
                    if status == 200 and PENDING not in body:
                        break
                    if not long_poll:
                        await asyncio.sleep(float(headers.get(b"retry-after", b"1")))
                latencies.append(time.perf_counter() - accepted)
                polls["decided"] += 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(buyer() for _ in range(buyers)))
    seconds = time.perf_counter() - started
    latencies.sort()
    decided = polls["decided"]
    return {
        "purchases": purchases,
        "buyers": buyers,
        "decided": decided,
        "status_requests": polls["status requests"],
        "status_requests_per_purchase": polls["status requests"] / decided if decided else 0.0,
        "accepted_to_decided_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0,
        "accepted_to_decided_p99_ms": 1000 * latencies[int(0.99 * len(latencies))]
        if latencies
        else 0,
        "seconds": seconds,
        "other": {k: v for k, v in polls.items() if k.startswith("purchase")},
    }


async def hold_waiters(
    base_url: str,
    purchase_ids: list[str],
    *,
    sse: bool,
    start_deciding: Callable[[], Awaitable[None]],
    sample_rss: Callable[[], float],
    commits: CommitClock | ReleaseClock,
) -> dict[str, Any]:
    """One connection per purchase, each waiting for its decision (long-poll or server-sent
    events); once all are held, `start_deciding()`. Latency: from the decision's commit, as
    `commits` heard it, to the answer read."""
    received_at: dict[str, float] = {}
    held = 0
    all_held = asyncio.Event()
    failures: Counter[str] = Counter()

    async def waiter(purchase_id: str) -> None:
        nonlocal held
        conn = await Connection.open(base_url)
        try:
            if sse:
                body = await _first_decided_event(conn, purchase_id, on_held=lambda: _held())
            else:
                conn.send("GET", f"/purchases/{purchase_id}?wait=30")
                _held()
                status, _, body = await conn.response()
                if status != 200:
                    failures[f"status {status}"] += 1
                    return
            received = time.time()
            decided = orjson.loads(body)
            if decided["status"] == "pending":
                failures["still pending at the timeout"] += 1
                return
            received_at[purchase_id] = received
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            failures[type(exc).__name__] += 1
        finally:
            conn.close()

    def _held() -> None:
        nonlocal held
        held += 1
        if held == len(purchase_ids):
            all_held.set()

    tasks = []
    for start in range(0, len(purchase_ids), 500):  # opened in waves: the accept backlog
        tasks += [asyncio.create_task(waiter(p)) for p in purchase_ids[start : start + 500]]
        await asyncio.sleep(0.05)
    await asyncio.wait_for(all_held.wait(), 60)
    await asyncio.sleep(1.0)  # every request has reached the API and is waiting
    rss = sample_rss()
    with _client_heap_frozen():
        await start_deciding()
        # Bounded: a server that holds an answer for ever fails the run instead of hanging it.
        await asyncio.wait_for(asyncio.gather(*tasks), ANSWERED_WITHIN_S)
    await asyncio.sleep(0.5)  # the commit clock's thread may hear a notification after its client
    heard = []
    for purchase_id, received in received_at.items():
        committed = commits.heard.get(purchase_id)
        if committed is None:
            failures["decision never announced"] += 1
        else:
            heard.append(received - committed)
    heard.sort()
    decided_in = max(commits.heard.values()) - min(commits.heard.values()) if commits.heard else 0
    return {
        "waiters": len(purchase_ids),
        "decided_within_s": decided_in,
        "answered": len(heard),
        "failures": dict(failures),
        "decision_to_client_p50_ms": 1000 * heard[len(heard) // 2] if heard else None,
        "decision_to_client_p99_ms": 1000 * heard[int(0.99 * len(heard))] if heard else None,
        "api_rss_mb_with_waiters": rss,
    }


@contextlib.contextmanager
def _client_heap_frozen() -> Iterator[None]:
    """This client's own objects (a connection, a task and their buffers per waiter) kept out of
    its garbage collector's scans while it measures: collections of them paused it for 10-30 ms
    (80 ms for a full one) in the middle of a measurement, and the latency would have counted
    those pauses against the server."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _first_decided_event(
    conn: Connection, purchase_id: str, *, on_held: Callable[[], None]
) -> bytes:
    """Open the purchase's event stream; the data of its first event past pending."""
    conn.send("GET", f"/purchases/{purchase_id}/events", headers=b"Accept: text/event-stream\r\n")
    status, _ = await conn.head()
    if status != 200:
        raise ConnectionError(f"stream refused: {status}")
    on_held()
    # Every event is written as one chunk; chunk sizes, blank lines and comments are skipped.
    while True:
        line = await conn.line()
        if line.startswith(b"data: ") and PENDING not in line:
            return line[6:].strip()


async def wait_estimates(
    base_url: str,
    event_id: str,
    *,
    overload: float,
    observe_s: float,
    decided_count: Callable[[], Awaitable[int]],
    read_decided: Callable[[list[str]], Awaitable[dict[str, float]]],
) -> dict[str, Any]:
    """The wait ahead, given right after the 202, against the real wait, with a steady backlog:
    a worker slower than the flow of purchases (the caller runs it with small commits), so the
    backlog grows at a steady pace. Its pace is measured first, under a burst it cannot keep up
    with; once that backlog is gone and the partition idles again, purchases flow at `overload`
    times that pace for `observe_s`. A probe is every 20th purchase: its estimate is read at
    once, its real wait is processed_at - accepted_at."""
    pace = await _worker_pace(base_url, event_id, decided_count)
    probes: dict[str, float | None] = {}
    accepted_at: dict[str, float] = {}
    await _flow(
        base_url,
        event_id,
        rate_per_s=overload * pace,
        seconds=observe_s,
        probes=(probes, accepted_at),
    )
    decided = await read_decided(list(probes))
    within = total = unknown = 0
    errors: list[float] = []
    for purchase_id, estimate in probes.items():
        if purchase_id not in decided:
            continue
        real = decided[purchase_id] - accepted_at[purchase_id]
        if real < 0.2:
            continue  # no backlog ahead of it: nothing to estimate
        total += 1
        if estimate is None:
            unknown += 1
            continue
        errors.append(estimate / real - 1)
        within += abs(estimate - real) <= 0.5 * real
    errors.sort()
    return {
        "worker_pace_per_s": pace,
        "rate_per_s": overload * pace,
        "observe_s": observe_s,
        "probes_with_a_wait": total,
        "estimate_unknown": unknown,
        "within_50_percent": within,
        "share_within_50_percent": within / total if total else 0.0,
        "median_relative_error": errors[len(errors) // 2] if errors else None,
    }


async def _worker_pace(
    base_url: str, event_id: str, decided_count: Callable[[], Awaitable[int]]
) -> float:
    """Purchases the worker decides per second while it has a backlog: a 1.5 s burst it cannot
    keep up with, its decisions counted over the next 1.5 s; then wait until it is idle again
    and its horizon has kept up with the clock for a few seconds."""
    sent = await _flow(base_url, event_id, rate_per_s=4_000, seconds=1.5)
    before, started = await decided_count(), time.monotonic()
    await asyncio.sleep(1.5)
    pace = (await decided_count() - before) / (time.monotonic() - started)
    for _ in range(600):  # at most two minutes
        if await decided_count() >= sent:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(4.0)
    return pace


async def _flow(
    base_url: str,
    event_id: str,
    *,
    rate_per_s: float,
    seconds: float,
    probes: tuple[dict[str, float | None], dict[str, float]] | None = None,
) -> int:
    """Purchases at a steady rate from 16 connections for `seconds`; every 20th is probed for
    its estimate when `probes` are given. Returns how many were accepted."""
    senders = 16
    interval = senders / rate_per_s
    deadline = time.monotonic() + seconds
    accepted = 0

    async def sender(number: int) -> None:
        nonlocal accepted
        conn = await Connection.open(base_url)
        sent = 0
        try:
            next_at = time.monotonic() + number * interval / senders
            while time.monotonic() < deadline:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
                status, _, body = await conn.request(
                    "POST",
                    f"/events/{event_id}/tickets/purchase",
                    purchase_body(number * 1_000_000 + sent),
                )
                sent += 1
                if status != 202:
                    continue
                accepted += 1
                if probes is None or sent % 20:
                    continue
                purchase = orjson.loads(body)
                _, _, state = await conn.request("GET", purchase["status_url"])
                read = orjson.loads(state)
                if read["status"] != "pending" or read.get("accepted_at") is None:
                    continue  # decided already: no wait to estimate
                queue = read.get("queue") or {}
                estimates, accepted_at = probes
                estimates[purchase["purchase_id"]] = queue.get("estimated_wait_s")
                accepted_at[purchase["purchase_id"]] = datetime.fromisoformat(
                    read["accepted_at"]
                ).timestamp()
        finally:
            conn.close()

    await asyncio.gather(*(sender(n) for n in range(senders)))
    return accepted
