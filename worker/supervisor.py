"""The worker process: joins the membership, holds its fair share of partition leases, runs a
consumer per leased partition, and on SIGTERM hands everything back cleanly.

Membership and leases go through a control pool of their own: commits (possibly many, possibly
slow, waiting on row locks) share the other pool, and must never delay the heartbeat or a lease's
renewal, or one slow commit would cost the worker every lease it holds.
"""

import asyncio
import contextlib
import logging
import time
from uuid import uuid4

import asyncpg
from aio_pika.abc import AbstractConnection

from shared import broker
from shared.broker_nodes import connect_any
from shared.cluster_config import agree_on_partitions
from shared.db import CUSTOM_PLANS, Connection, create_pool
from shared.gc_tuning import tune_gc
from shared.retry import TRANSIENT_DATABASE
from shared.settings import Settings
from shared.urls import where
from worker import leases, membership, metrics
from worker.consumer import PartitionConsumer
from worker.dead_letters import DeadLetterRecorder
from worker.leases import Lease

log = logging.getLogger(__name__)

# A partition being handed over (rebalance or shutdown) gets at most half a lease lifetime to
# apply and ack what was delivered. Its lease is still renewed meanwhile, so no one else can take
# the partition while it drains; and a drain that cannot finish (database down) is aborted, its
# messages returned to the head of the queue, well before the lease could expire.
DRAIN_SHARE_OF_LEASE = 0.5
JOIN_WINDOW_S = 1.0
# A lease this worker has not extended for this share of its lifetime (its database is out of
# reach, say) is given up here: its consumer stops and its channel closes, so the messages it
# holds unacked go back to the queue at least a tick before another worker can take the lease
# over. Otherwise the broker keeps this worker as the queue's single active consumer, the new
# owner receives nothing, and the queue looks drained to it while this one holds the messages.
UNPROVEN_SHARE_OF_LEASE = 2 / 3


class IdentityLost(RuntimeError):
    """Another process took this worker's WORKER_ID over (this one was frozen past its
    lifetime): it must stop, since its leases are now the other's to take."""


def batch_session(settings: Settings) -> dict[str, str]:
    """The session settings of the connections that commit batches."""
    return {
        # A transaction left idle (this process frozen mid-commit, its network cut) is ended by
        # the server after a lease's lifetime, releasing the lease row it holds; its commit then
        # fails, as fencing requires.
        "idle_in_transaction_session_timeout": str(max(1000, int(settings.lease_ttl_s * 1000))),
        # A backlog of 100,000 purchases drained 3x slower on the plans it would otherwise
        # keep; planning costs a few statements per batch of up to hundreds.
        **CUSTOM_PLANS,
    }


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.incarnation = uuid4()
        self.topology = broker.Topology.from_settings(settings)
        self.tick_s = settings.lease_ttl_s / 3
        self._stopping = asyncio.Event()
        self._pool: asyncpg.Pool | None = None  # commits
        self._control: asyncpg.Pool | None = None  # membership and leases
        self._connection: AbstractConnection | None = None
        self._node = -1  # index in RABBITMQ_URL of the node connected to (or last lost)
        self._declared = False  # the topology, bindings included, on some connection before
        self._recorder: DeadLetterRecorder | None = None
        self._held: dict[int, int] = {}  # partition -> lease epoch
        # Read when scraped, not set at a tick: a lease handed over or lost between two ticks
        # would otherwise still count for up to one (one worker per process).
        metrics.PARTITIONS_OWNED.set_function(lambda: len(self._held))
        # partition -> when (time.monotonic) the statement that last extended its lease was sent
        self._extended: dict[int, float] = {}
        self._consumers: dict[int, PartitionConsumer] = {}
        self._draining: dict[int, asyncio.Task[None]] = {}  # partitions being handed over
        # Partitions whose lease was lost, while their consumer stops: not taken again until then.
        self._giving_up: set[int] = set()
        self._retired_applied = 0
        self.drain_timeout_s = settings.lease_ttl_s * DRAIN_SHARE_OF_LEASE

    @property
    def applied(self) -> int:
        """Purchases this process decided (confirmed or rejected), for logs and tests."""
        return self._retired_applied + sum(c.applied for c in self._consumers.values())

    def stop(self) -> None:
        self._stopping.set()

    @property
    def partitions(self) -> list[int]:
        return sorted(self._held)

    async def run(self) -> None:
        started = time.monotonic()
        joined = False  # a process refused its WORKER_ID never ran: it says so, not "stopped"
        self._pool = await create_pool(self.settings, server_settings=batch_session(self.settings))
        try:
            # Two: the tick, and a hand-over releasing its lease beside it. A statement that
            # hangs fails within a tick, and the next tick tries again.
            self._control = await create_pool(
                self.settings, size=(1, 2), command_timeout_s=self.tick_s
            )
            await self._join()
            joined = True
            log.info("worker %s started", self.worker_id)
            tune_gc()
            # Workers started together (a deploy, --scale) see each other before anyone takes a
            # lease, instead of the first grabbing every partition and handing half back.
            await self._sleep(min(self.tick_s, JOIN_WINDOW_S))
            while not self._stopping.is_set():
                connection = await self._connect()
                if connection is None:
                    break
                try:
                    await self._serve(connection)
                finally:
                    await self._disconnect(graceful=self._stopping.is_set())
        finally:
            await self._leave()
            if self._control is not None:
                await self._control.close()
            await self._pool.close()
            if joined:
                log.info(
                    "worker %s stopped after %.1f s: %d purchases decided",
                    self.worker_id,
                    time.monotonic() - started,
                    self.applied,
                )

    async def _join(self) -> None:
        """Check PARTITIONS, make sure every lease row exists, and become the live holder of
        WORKER_ID: a crashed predecessor's membership expires within a lease lifetime, so that
        long is waited before the id counts as taken by someone alive."""
        async with self._control_pool().acquire() as conn:
            await agree_on_partitions(conn, self.topology.partitions)
            await leases.ensure_partitions(conn, self.topology.partitions)
            await membership.forget_long_dead_workers(conn)
            await membership.join(
                conn,
                self.worker_id,
                self.incarnation,
                self.settings.lease_ttl_s,
                wait_s=self.settings.lease_ttl_s + self.tick_s,
            )

    async def _connect(self) -> AbstractConnection | None:
        delay = 0.2
        while not self._stopping.is_set():
            connection: AbstractConnection | None = None
            try:
                # After a loss, the nodes after the lost one first: it is likely the one down.
                connection, self._node = await connect_any(
                    self.settings, f"worker {self.worker_id}", first=self._node + 1
                )
                # After a loss, what exists is not bound again: that would wait for a frozen
                # node until the cluster gives it up (broker.declare_topology). After a
                # declaration cut short, everything is: it may have made an exchange unbound.
                rebind, self._declared = not self._declared, False
                await broker.declare_topology(connection, self.topology, rebind=rebind)
                self._declared = True
                self._connection = connection
                self._recorder = DeadLetterRecorder(self._commit_pool(), self.topology)
                await self._recorder.start(connection)
                log.info(
                    "connected to rabbitmq node %s", where(self.settings.rabbitmq_urls[self._node])
                )
                return connection
            except broker.TopologyMismatch:
                raise  # a configuration error: retrying cannot fix it
            except Exception as exc:  # refused, reset, or lost between connecting and declaring
                log.warning("rabbitmq unavailable (%r); retrying in %.1f s", exc, delay)
                if connection is not None and not connection.is_closed:
                    with contextlib.suppress(Exception):
                        await connection.close()
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    async def _serve(self, connection: AbstractConnection) -> None:
        # aio-pika leaves a plain connection's is_closed False when the broker goes away
        # abruptly; its close callbacks do fire, so they are what tells us it is gone.
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        # Beside the ticks, not in them: a tick may wait on the very database that is gone.
        watchdog = asyncio.create_task(self._watch_leases(), name="lease-watchdog")
        try:
            while not self._stopping.is_set() and not lost.is_set():
                try:
                    await self._tick(connection)
                except IdentityLost:
                    raise
                except TRANSIENT_DATABASE as exc:
                    # Consumers keep their batches and retry; leases are re-checked next tick.
                    log.warning("lease tick failed: %r", exc)
                except Exception:
                    if lost.is_set():
                        break  # lost mid-tick (opening a channel, say): reconnect
                    log.exception("lease tick failed")
                await self._sleep(self.tick_s, lost)
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        if lost.is_set():
            log.warning("rabbitmq connection lost; reconnecting")

    async def _watch_leases(self) -> None:
        """Give up, a few times a tick, the leases not extended for too long."""
        while True:
            await asyncio.sleep(self.tick_s / 4)
            try:
                await self._give_up_unproven()
            except Exception:
                log.exception("lease watchdog failed")

    async def _give_up_unproven(self) -> None:
        limit_s = self.settings.lease_ttl_s * UNPROVEN_SHARE_OF_LEASE
        now = time.monotonic()
        for partition in list(self._held):
            since = self._extended.get(partition, now)
            if now - since < limit_s or partition in self._draining:
                continue  # (a hand-over aborts its own drain well within the lease)
            await self._give_up(
                partition,
                f"lease lost: not extended for {now - since:.1f} s; stopping its consumer before "
                "it is taken over",
            )

    async def _give_up(self, partition: int, why: str) -> None:
        """Stop consuming a partition whose lease is lost, once. The watchdog and the ticks may
        both find it lost, and each one's wait (a consumer's abort) lets the other run: the
        first to take it from the held leases gives it up and counts it; the other finds it
        gone."""
        epoch = self._held.pop(partition, None)
        if epoch is None:
            return
        log.warning(why, extra={"partition": partition, "epoch": epoch})
        metrics.LEASES_LOST.inc()
        self._giving_up.add(partition)
        try:
            # Bounded: a consumer that cannot stop (a channel whose close is never answered)
            # must not keep its partition from being taken again for good.
            async with asyncio.timeout(self.drain_timeout_s):
                await self._drop(partition, graceful=False)
        except TimeoutError:
            log.warning("partition %d: its consumer did not stop in time", partition)
        finally:
            self._giving_up.discard(partition)

    async def _tick(self, connection: AbstractConnection) -> None:
        """One round of keeping the worker's share: stay a member, keep what is held, replace
        what broke, give up what is no longer ours, take what is."""
        async with self._control_pool().acquire() as conn:
            await self._heartbeat(conn)
            await self._renew(conn)
        await self._replace_broken(connection)
        mine = await self._assigned()
        # Handed over in the background: the ticks go on renewing every lease (the draining
        # ones included) while they finish.
        for partition in set(self._held) - mine - set(self._draining):
            self._hand_over(partition)
        await self._acquire(mine - set(self._held) - self._giving_up)
        for partition, epoch in list(self._held.items()):
            if partition not in self._consumers and partition not in self._draining:
                await self._start_consumer(connection, partition, epoch)

    async def _heartbeat(self, conn: Connection) -> None:
        ttl_s = self.settings.lease_ttl_s
        if not await membership.heartbeat(conn, self.worker_id, self.incarnation, ttl_s):
            raise IdentityLost(
                f"WORKER_ID {self.worker_id!r} was taken over by another process while this one "
                "did not heartbeat: stopping, and leaving its partitions to it."
            )

    async def _renew(self, conn: Connection) -> None:
        """Extend every lease held; drop those taken over."""
        if not self._held:
            return
        asked = time.monotonic()
        renewal = await leases.renew(conn, self.worker_id, self._held, self.settings.lease_ttl_s)
        for partition in renewal.renewed:
            self._extended[partition] = asked
        if renewal.skipped:
            log.info("leases not renewed this tick (locked): %s", sorted(renewal.skipped))
        for partition in renewal.lost:
            await self._give_up(partition, "lease taken over")

    async def _replace_broken(self, connection: AbstractConnection) -> None:
        """Reopen a dead-letter recorder whose channel closed, and retire consumers that ended
        on their own (lease lost at commit, channel closed, unexpected error): the next step
        starts new ones for the partitions still held."""
        if self._recorder is not None and self._recorder.broken:
            log.warning("dead-letter recorder channel closed; reopening it")
            self._recorder = DeadLetterRecorder(self._commit_pool(), self.topology)
            await self._recorder.start(connection)
        for partition, consumer in list(self._consumers.items()):
            # Taken out before the abort's wait, in which the watchdog may give the partition
            # up: it then finds no consumer of it to stop again.
            if consumer.broken and self._consumers.get(partition) is consumer:
                self._retire(partition)
                await consumer.abort()
                if consumer.lost_lease and self._held.pop(partition, None) is not None:
                    metrics.LEASES_LOST.inc()  # (unless the watchdog gave it up meanwhile)

    async def _assigned(self) -> set[int]:
        """The partitions the shared assignment gives this worker now."""
        async with self._control_pool().acquire() as conn:
            workers = await membership.live_workers(conn)
            owners = await leases.live_owners(conn)
        assignment = leases.assign(self.topology.partitions, workers or [self.worker_id], owners)
        return {p for p, owner in assignment.items() if owner == self.worker_id}

    async def _acquire(self, partitions: set[int]) -> None:
        """Take each of `partitions` whose lease is free (released, or expired)."""
        if not partitions:
            return
        async with self._control_pool().acquire() as conn:
            for partition in sorted(partitions):
                asked = time.monotonic()
                acquired = await leases.acquire(
                    conn, partition, self.worker_id, self.settings.lease_ttl_s
                )
                if acquired is None:
                    continue
                self._held[partition] = acquired.epoch
                self._extended[partition] = asked
                metrics.LEASES_ACQUIRED.inc()
                if acquired.previous_owner not in (None, self.worker_id):
                    metrics.LEASE_TAKEOVERS.inc()
                log.info(
                    "lease acquired",
                    extra={
                        "partition": partition,
                        "epoch": acquired.epoch,
                        "previous_owner": acquired.previous_owner,
                    },
                )

    async def _start_consumer(
        self, connection: AbstractConnection, partition: int, epoch: int
    ) -> None:
        consumer = PartitionConsumer(
            pool=self._commit_pool(),
            topology=self.topology,
            lease=Lease(partition=partition, owner=self.worker_id, epoch=epoch),
            batch_size=self.settings.batch_size,
            batch_max_wait_s=self.settings.batch_max_wait_ms / 1000,
        )
        try:
            # Bounded: it reads from the commit pool, whose connections may all be stuck behind
            # locks, and the tick that waits here is the one that renews every lease.
            async with asyncio.timeout(self.tick_s):
                await consumer.start(connection)
        except BaseException:
            await consumer.abort()  # closes the channel it may have opened
            raise
        if self._held.get(partition) != epoch:  # given up while it started
            await consumer.abort()
            return
        self._consumers[partition] = consumer

    def _hand_over(self, partition: int) -> None:
        task = asyncio.create_task(self._drop(partition, graceful=True))
        self._draining[partition] = task
        task.add_done_callback(lambda _: self._draining.pop(partition, None))

    async def _drop(self, partition: int, *, graceful: bool) -> None:
        """Stop consuming a partition; when graceful, finish and ack its batch, then release."""
        consumer = self._consumers.pop(partition, None)
        if consumer is not None:
            if graceful:
                try:
                    await asyncio.wait_for(consumer.stop(), self.drain_timeout_s)
                except TimeoutError:
                    log.warning("partition %d: drain timed out; batch left unacked", partition)
                    await consumer.abort()
            else:
                await consumer.abort()
            self._retired_applied += consumer.applied
        epoch = self._held.pop(partition, None)
        if graceful and epoch is not None:
            try:
                async with self._control_pool().acquire() as conn:
                    await leases.release(conn, partition, self.worker_id, epoch)
                log.info("lease released", extra={"partition": partition, "epoch": epoch})
            except TRANSIENT_DATABASE as exc:
                log.warning("partition %d: release failed (%r); it will expire", partition, exc)

    def _retire(self, partition: int) -> None:
        consumer = self._consumers.pop(partition)
        self._retired_applied += consumer.applied

    async def _disconnect(self, *, graceful: bool) -> None:
        if graceful:
            handing_over = list(self._draining.values())
            await asyncio.gather(
                *handing_over,
                *(
                    self._drop(p, graceful=True)
                    for p in list(self._held)
                    if p not in self._draining
                ),
            )
        else:
            # The connection is gone: nothing in hand can be acked; keep the leases and
            # re-subscribe once reconnected.
            for partition, consumer in list(self._consumers.items()):
                self._retire(partition)
                await consumer.abort()
        if self._recorder is not None:
            await self._recorder.stop()
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None

    async def _leave(self) -> None:
        if self._control is None:
            return
        try:
            async with self._control.acquire() as conn:
                for partition, epoch in list(self._held.items()):
                    await leases.release(conn, partition, self.worker_id, epoch)
                self._held.clear()
                await membership.leave(conn, self.worker_id, self.incarnation)
        except TRANSIENT_DATABASE as exc:
            log.warning("could not leave cleanly (%r); leases will expire", exc)

    async def _sleep(self, seconds: float, *also: asyncio.Event) -> None:
        """Sleep, but wake as soon as the worker is told to stop (or any of `also` is set)."""
        waits = {asyncio.ensure_future(e.wait()) for e in (self._stopping, *also)}
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _commit_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("worker not started")
        return self._pool

    def _control_pool(self) -> asyncpg.Pool:
        if self._control is None:
            raise RuntimeError("worker not started")
        return self._control
