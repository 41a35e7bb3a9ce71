"""Helpers for the worker tests: waiting on conditions, floods of purchases, `python -m worker`
subprocesses, reading the lease table and the partition queues, and invariant checks in SQL."""

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import httpx

from shared import broker_nodes
from shared.broker import Topology
from shared.messages import PurchaseMessage, PurchaseRequested
from shared.settings import Settings
from tests.conftest import settings_env
from tests.factories import FINAL, create_event, purchase
from worker.decision import EventRules, decide

ROOT = Path(__file__).resolve().parents[2]


# --- waiting -----------------------------------------------------------------------------------


async def wait_for(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
) -> float:
    """Poll `condition` until it holds; return the seconds it took. Fail after `timeout_s`."""
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        if await condition():
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)


# --- events, partitions and purchases ----------------------------------------------------------


def topology(settings: Settings) -> Topology:
    return Topology.from_settings(settings)


def partition_of(settings: Settings, event_id: str | UUID) -> int:
    return topology(settings).partition_of(UUID(str(event_id)))


async def create_event_in_partition(
    api: httpx.AsyncClient, settings: Settings, partition: int, **overrides: Any
) -> dict[str, Any]:
    """Create events until one routes to `partition` (ids are random; a few tries suffice).
    The events that land elsewhere stay behind, unsold."""
    for _ in range(500):
        event = await create_event(api, **overrides)
        if partition_of(settings, event["id"]) == partition:
            return event
    raise AssertionError(f"no event routed to partition {partition} in 500 tries")


@dataclass
class Flood:
    """Purchases sent concurrently (at most `concurrency` in flight), answers kept in order."""

    answered: list[httpx.Response] = field(default_factory=list)
    quantities: dict[UUID, int] = field(default_factory=dict)

    @property
    def accepted(self) -> list[UUID]:
        """Purchase ids answered 202, in answer order."""
        return [UUID(r.json()["purchase_id"]) for r in self.answered if r.status_code == 202]

    def statuses(self) -> Counter[int]:
        return Counter(r.status_code for r in self.answered)


async def flood(
    api: httpx.AsyncClient,
    event_ids: Sequence[str],
    count: int,
    *,
    concurrency: int,
    max_quantity: int = 1,
    seed: int = 0,
    into: Flood | None = None,
) -> Flood:
    """Send `count` purchases spread over `event_ids`; only 202 (accepted) and 409 (sold out,
    nothing published) are expected answers."""
    result = into if into is not None else Flood()
    rnd = random.Random(seed)
    plan = [(rnd.choice(event_ids), rnd.randint(1, max_quantity)) for _ in range(count)]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int, event_id: str, quantity: int) -> None:
        async with semaphore:
            response = await purchase(
                api, event_id, quantity=quantity, customer_id=f"customer-{index}"
            )
        assert response.status_code in (202, 409), response.text
        result.answered.append(response)
        if response.status_code == 202:
            result.quantities[UUID(response.json()["purchase_id"])] = quantity

    await asyncio.gather(*(one(i, e, q) for i, (e, q) in enumerate(plan)))
    return result


def purchase_message(
    partition: int, event_id: str | UUID, *, quantity: int = 1, purchase_id: UUID | None = None
) -> PurchaseMessage:
    return PurchaseMessage(
        partition=partition,
        commands=[
            PurchaseRequested(
                purchase_id=purchase_id or uuid4(),
                event_id=UUID(str(event_id)),
                customer_id="customer-direct",
                quantity=quantity,
                accepted_at=datetime.now(UTC),
            )
        ],
    )


async def publish_raw(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, partition: int, body: bytes
) -> None:
    """Publish a persistent message straight to a partition queue (as the API would)."""
    exchange = await channel.get_exchange(topology(settings).exchange)
    await exchange.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=Topology.routing_key(partition),
    )


# --- queues ------------------------------------------------------------------------------------


async def take_and_die(settings: Settings, queue_name: str) -> bool:
    """Consume one message and close the connection without acking it; False if none came."""
    connection = await broker_nodes.connect(settings)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(queue_name)
        got: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not got.done():
                got.set_result(None)

        await queue.consume(hold)
        try:
            await asyncio.wait_for(got, 10)
        except TimeoutError:
            return False
        return True
    finally:
        await connection.close()  # died holding it: returned, delivery count + 1


async def queue_depth(settings: Settings, name: str) -> int:
    """Ready messages in a queue (passive declare), on a connection of its own."""
    connection = await broker_nodes.connect(settings)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await connection.close()


async def wait_queue_depth(
    settings: Settings, name: str, expected: int, *, timeout_s: float = 15.0
) -> None:
    async def reached() -> bool:
        return await queue_depth(settings, name) == expected

    await wait_for(reached, timeout_s=timeout_s, what=f"{expected} message(s) in {name}")


async def partition_depths(settings: Settings) -> dict[int, int]:
    tp = topology(settings)
    return {p: await queue_depth(settings, tp.queue(p)) for p in range(tp.partitions)}


async def read_back(settings: Settings, name: str, *, timeout_s: float = 10.0) -> list[bytes]:
    """Every ready message of a queue, left in place and in order. basic.get is refused on a
    single-active-consumer quorum queue, so a consumer (the only one: call this with no worker
    running) takes them unacked, and closing its connection returns them to the queue."""
    connection = await broker_nodes.connect(settings)
    bodies: list[bytes] = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        expected = queue.declaration_result.message_count or 0
        if expected == 0:
            return []
        await channel.set_qos(prefetch_count=expected)
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            received.put_nowait(message.body)

        await queue.consume(collect)
        deadline = time.monotonic() + timeout_s
        while len(bodies) < expected:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"read {len(bodies)} of {expected} messages of {name}"
            bodies.append(await asyncio.wait_for(received.get(), remaining))
    finally:
        await connection.close()
    return bodies


# --- leases ------------------------------------------------------------------------------------


async def lease_rows(db: asyncpg.Pool) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT partition, owner, epoch, expires_at, expires_at > now() AS live "
        "FROM partition_leases ORDER BY partition"
    )


async def owners(db: asyncpg.Pool) -> dict[int, str | None]:
    """Partition -> owner of a live lease (None when free or expired)."""
    return {row["partition"]: row["owner"] if row["live"] else None for row in await lease_rows(db)}


async def balanced(db: asyncpg.Pool, partitions: int, workers: Sequence[str]) -> bool:
    """Every partition is leased (live) by one of `workers`, all of them live (heartbeating),
    each owning floor or ceil of P/N, and none of the others holds anything."""
    current = await owners(db)
    if sorted(current) != list(range(partitions)):
        return False
    if any(owner not in workers for owner in current.values()):
        return False
    if not set(workers) <= await live_worker_ids(db):
        return False
    counts = Counter(current.values())
    low, high = partitions // len(workers), -(-partitions // len(workers))
    return all(low <= counts.get(worker, 0) <= high for worker in workers)


async def live_worker_ids(db: asyncpg.Pool) -> set[str]:
    rows = await db.fetch("SELECT worker_id FROM workers WHERE expires_at > now()")
    return {row["worker_id"] for row in rows}


async def wait_balanced(
    db: asyncpg.Pool, partitions: int, workers: Sequence[str], *, timeout_s: float = 20.0
) -> float:
    return await wait_for(
        lambda: balanced(db, partitions, workers),
        timeout_s=timeout_s,
        what=f"{partitions} partitions balanced over {list(workers)}",
    )


# --- invariants --------------------------------------------------------------------------------


async def assert_applied_once(
    db: asyncpg.Pool, accepted: Iterable[UUID], quantities: dict[UUID, int] | None = None
) -> None:
    """Every accepted purchase has exactly one row (and nothing else has one), with the quantity
    it was accepted with; no id was answered twice."""
    ids = list(accepted)
    assert len(ids) == len(set(ids)), "a purchase id was answered 202 twice"
    rows = await db.fetch("SELECT id, quantity, status FROM purchases")
    recorded = Counter(row["id"] for row in rows)
    assert all(n == 1 for n in recorded.values())
    assert set(recorded) == set(ids), (
        f"{len(set(ids) - set(recorded))} accepted purchases without a row, "
        f"{len(set(recorded) - set(ids))} rows for purchases never accepted"
    )
    assert all(row["status"] in FINAL for row in rows)
    if quantities is not None:
        wrong = [row["id"] for row in rows if row["quantity"] != quantities[row["id"]]]
        assert not wrong, f"purchases recorded with another quantity: {wrong[:5]}"


async def assert_first_come_first_served(db: asyncpg.Pool) -> None:
    """Replay every event's recorded purchases, in the order the API accepted them, through the
    decision rules from the event's total: each status and reason must match what was recorded.

    One API process stamps `accepted_at` right before handing the purchase to the publisher's
    per-partition lane (no await in between), so `accepted_at` order is queue order."""
    events = await db.fetch(
        "SELECT id, total_tickets, available_tickets, starts_at, sales_start_at, sales_end_at, "
        "max_tickets_per_customer, hold_seconds FROM events"
    )
    rows = await db.fetch(
        "SELECT id, event_id, customer_id, quantity, status, reason, accepted_at, processed_at "
        "FROM purchases WHERE status <> 'failed' ORDER BY accepted_at, id"
    )
    by_event: dict[UUID, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        by_event[row["event_id"]].append(row)
    for event in events:
        mine = by_event.get(event["id"], [])
        requested = [
            PurchaseRequested(
                purchase_id=row["id"],
                event_id=row["event_id"],
                customer_id=row["customer_id"],
                quantity=row["quantity"],
                accepted_at=row["accepted_at"],
            )
            for row in mine
        ]
        assert event["hold_seconds"] is None, "holds expire by the clock: not replayable"
        rules = EventRules(
            available=event["total_tickets"],
            starts_at=event["starts_at"],
            sales_start_at=event["sales_start_at"],
            sales_end_at=event["sales_end_at"],
            max_tickets_per_customer=event["max_tickets_per_customer"],
        )
        outcome = decide({event["id"]: rules}, {}, {}, requested, now=datetime.now(UTC))
        left, decisions = outcome.available, outcome.decisions
        for row, decision in zip(mine, decisions, strict=True):
            expected = (decision.status.value, decision.reason.value if decision.reason else None)
            assert (row["status"], row["reason"]) == expected, (
                f"event {event['id']}: purchase {row['id']} (quantity {row['quantity']}, accepted "
                f"{row['accepted_at']}) recorded {row['status']}/{row['reason']}, "
                f"first come first served says {expected}"
            )
        assert left[event["id"]] == event["available_tickets"]
        processed = [row["processed_at"] for row in mine]
        assert processed == sorted(processed), (
            f"event {event['id']}: purchases processed out of accepted order"
        )


# --- worker subprocesses -----------------------------------------------------------------------


@dataclass
class WorkerProcess:
    worker_id: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, signum: signal.Signals) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    async def wait(self, timeout_s: float) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    async def kill(self) -> None:
        self.send(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self.process.wait()


Spawn = Callable[..., Awaitable[WorkerProcess]]


@contextlib.asynccontextmanager
async def worker_processes(settings: Settings, log_dir: Path) -> AsyncIterator[Spawn]:
    """Start `python -m worker` subprocesses; every one still running is SIGKILLed on the way
    out, and on failure their logs are printed (pytest shows them with the failure)."""
    started: list[WorkerProcess] = []

    async def spawn(worker_id: str, **env_overrides: object) -> WorkerProcess:
        env = settings_env(settings)
        env["WORKER_ID"] = worker_id
        env.update({name.upper(): str(value) for name, value in env_overrides.items()})
        # One file per process: two processes given the same WORKER_ID (a takeover test) must
        # not write over each other's log.
        log_path = log_dir / f"{worker_id}.{len(started)}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker",
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        worker = WorkerProcess(worker_id, process, log_path)
        started.append(worker)
        return worker

    failed = True
    try:
        yield spawn
        failed = False
    finally:
        for worker in started:
            await worker.kill()
        if failed:
            for worker in started:
                tail = "\n".join(worker.log().splitlines()[-40:])
                print(f"--- {worker.worker_id} (exit {worker.process.returncode}) ---\n{tail}")


async def wait_started(
    db: asyncpg.Pool, workers: Sequence[WorkerProcess], *, timeout_s: float = 30.0
) -> None:
    """Wait until every worker process heartbeats; fail at once, with its log, if one exits."""

    async def all_live() -> bool:
        for worker in workers:
            if not worker.running:
                raise AssertionError(
                    f"{worker.worker_id} exited with {worker.process.returncode} at start-up:\n"
                    + worker.log()[-3000:]
                )
        return {w.worker_id for w in workers} <= await live_worker_ids(db)

    await wait_for(all_live, timeout_s=timeout_s, what="the worker processes to start")


async def open_transactions_older_than(db: asyncpg.Pool, seconds: float) -> int:
    """Sessions of this database left inside a transaction for longer than `seconds`."""
    count: int = await db.fetchval(
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND xact_start IS NOT NULL AND now() - xact_start > make_interval(secs => $1)
        """,
        seconds,
    )
    return count
