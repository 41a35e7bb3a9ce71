"""Consumes one partition queue: batches in arrival order, one transaction per batch, then acks.

One channel per partition: `ack(multiple=True)` acknowledges everything up to a delivery tag on
its channel, and a channel of its own keeps that to this partition's messages. Deliveries go into
an inbox in the order the broker sent them and are handled by a single loop, never by concurrent
callbacks, so purchases of one event are applied in the order they were accepted.

Consuming, acking and rejecting use aio-pika's underlying aiormq channel: aio-pika would wrap
every delivery in an IncomingMessage and a second task, a third of a busy worker's CPU.
"""

import asyncio
import logging
import time
from datetime import UTC, datetime

import aiormq
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from shared.broker import Topology
from shared.messages import PurchaseMessage, PurchaseRequested
from shared.retry import TRANSIENT_DATABASE, until_stopped
from worker import metrics
from worker.leases import LeaseLost
from worker.processor import BatchResult, Lease, VersionConflict, apply_batch

log = logging.getLogger(__name__)


class PartitionConsumer:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        topology: Topology,
        lease: Lease,
        batch_size: int,
        batch_max_wait_s: float,
    ) -> None:
        self.lease = lease
        self._pool = pool
        self._topology = topology
        self._batch_size = batch_size
        self._batch_max_wait_s = batch_max_wait_s
        self._inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        self._channel: AbstractChannel | None = None
        self._amqp: aiormq.abc.AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._draining = asyncio.Event()  # stop taking; finish what was delivered
        self._aborted = False  # stop now; unacked messages go back to the queue
        self._task: asyncio.Task[None] | None = None
        self.applied = 0
        self.lost_lease = False

    @property
    def partition(self) -> int:
        return self.lease.partition

    @property
    def broken(self) -> bool:
        """The loop ended on its own (lease lost, unexpected error) or the broker closed the
        channel under it: the supervisor replaces it."""
        ended = self._task is not None and self._task.done()
        closed = (self._channel is not None and self._channel.is_closed) or (
            self._amqp is not None and self._amqp.is_closed
        )
        return ended or closed

    async def start(self, connection: AbstractConnection) -> None:
        self._channel = await connection.channel()
        # Enough for the next batch to be on its way while this one commits.
        await self._channel.set_qos(prefetch_count=self._batch_size * 2)
        self._amqp = await self._channel.get_underlay_channel()
        consumed = await self._amqp.basic_consume(
            self._topology.queue(self.partition), self._deliver
        )
        self._consumer_tag = consumed.consumer_tag
        self._task = asyncio.create_task(self._run(), name=f"partition-{self.partition}")

    async def _deliver(self, message: DeliveredMessage) -> None:
        self._inbox.put_nowait(message)

    async def stop(self) -> None:
        """Hand the partition back cleanly: cancel the subscription, apply and ack everything
        already delivered, close the channel."""
        if self._amqp is not None and self._consumer_tag is not None and not self._aborted:
            try:
                await self._amqp.basic_cancel(self._consumer_tag)
            except Exception as exc:  # channel already gone: its messages are requeued anyway
                log.warning("partition %d: cancel failed: %r", self.partition, exc)
            # Deliveries that raced the cancel reach the inbox on the next loop turns.
            await asyncio.sleep(0.05)
        self._draining.set()
        if self._task is not None:
            await asyncio.wait({self._task})
        await self._close_channel()

    async def abort(self) -> None:
        """Stop without acking what is in hand (lease lost, connection lost, shutdown during an
        outage): the broker redelivers it to the partition's next owner."""
        self._aborted = True
        self._draining.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        await self._close_channel()

    async def _close_channel(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception as exc:
                log.debug("partition %d: channel close: %r", self.partition, exc)

    async def _run(self) -> None:
        try:
            while True:
                messages = await self._next_batch()
                if not messages:
                    return
                await self._handle(messages)
        except LeaseLost:
            self.lost_lease = True
            log.warning(
                "lease lost at commit; leaving the batch unacked",
                extra={"partition": self.partition, "epoch": self.lease.epoch},
            )
        except asyncio.CancelledError:
            if not self._aborted:
                raise
        except Exception:
            log.exception(
                "partition %d: consumer failed; leaving the batch unacked", self.partition
            )

    async def _next_batch(self) -> list[DeliveredMessage]:
        """Wait for a first message, then gather more for up to BATCH_MAX_WAIT_MS.
        Empty once draining and nothing delivered is left."""
        first = await self._get(wait_s=None)
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self._batch_max_wait_s
        while len(batch) < self._batch_size:
            message = await self._get(wait_s=max(0.0, deadline - time.monotonic()))
            if message is None:
                break
            batch.append(message)
        return batch

    async def _get(self, wait_s: float | None) -> DeliveredMessage | None:
        """The next delivery; None on timeout, or when draining and the inbox is empty."""
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        if self._draining.is_set() or wait_s == 0:
            return None
        get = asyncio.ensure_future(self._inbox.get())
        drain = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait({get, drain}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
            if not get.done():
                get.cancel()  # Queue.get leaves the item queued when cancelled
        if get.done() and not get.cancelled():
            return get.result()
        return self._inbox.get_nowait() if not self._inbox.empty() else None

    def _observe(
        self, purchases: list[PurchaseRequested], result: BatchResult, seconds: float
    ) -> None:
        self.applied += len(result.outcomes)
        metrics.COMMIT_SECONDS.observe(seconds)
        metrics.BATCH_SIZE.observe(len(purchases))
        metrics.DUPLICATES.inc(result.duplicates)
        oldest = min(p.accepted_at for p in purchases)
        metrics.LAG_SECONDS.labels(str(self.partition)).set(
            max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        )
        verbose = log.isEnabledFor(logging.INFO)
        for outcome in result.outcomes:
            reason = outcome.reason.value if outcome.reason else ""
            metrics.PURCHASES.labels(outcome.status.value, reason).inc()
            if verbose:
                log.info(
                    "purchase decided",
                    extra={
                        "purchase_id": str(outcome.purchase.purchase_id),
                        "event_id": str(outcome.purchase.event_id),
                        "partition": self.partition,
                        "status": outcome.status.value,
                        "reason": reason or None,
                    },
                )

    async def _handle(self, messages: list[DeliveredMessage]) -> None:
        purchases: list[PurchaseRequested] = []
        last_good: DeliveredMessage | None = None
        for message in messages:
            if message.redelivered:
                metrics.REDELIVERIES.inc()
            try:
                decoded = PurchaseMessage.from_body(message.body)
            except ValidationError:
                # A poison message must not block the partition: dead-letter it (the recorder
                # marks its readable purchase ids failed) and go on with the rest.
                log.error("undecodable message dead-lettered", extra={"partition": self.partition})
                metrics.DEAD_LETTERS.labels("undecodable_message").inc()
                await self._settle(message, ack=False)
                continue
            purchases.extend(decoded.purchases)
            last_good = message

        if purchases:
            started = time.perf_counter()
            async for attempt in until_stopped(
                (*TRANSIENT_DATABASE, VersionConflict), lambda: self._aborted
            ):
                with attempt:
                    result = await apply_batch(self._pool, self.lease, purchases)
            try:
                self._observe(purchases, result, time.perf_counter() - started)
            except Exception:  # bookkeeping must never stand between a commit and its ack
                log.exception("partition %d: metrics/logging failed", self.partition)
        if last_good is not None:
            # Committed: one ack covers the batch. multiple=True reaches only this channel's
            # deliveries, and every earlier one is in this batch (or was already settled).
            await self._settle(last_good, ack=True)

    async def _settle(self, message: DeliveredMessage, *, ack: bool) -> None:
        """Ack (with multiple: everything delivered up to it) or reject without requeue (to the
        dead-letter exchange)."""
        if self._amqp is None:
            raise RuntimeError("consumer not started")
        tag = message.delivery_tag
        if tag is None:
            raise RuntimeError("a delivery without a delivery tag")
        if ack:
            await self._amqp.basic_ack(tag, multiple=True)
        else:
            await self._amqp.basic_reject(tag, requeue=False)
