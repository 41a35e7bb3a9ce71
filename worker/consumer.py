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
from collections import Counter, deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

import aiormq
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from shared.broker import Topology
from shared.broker_nodes import HEARTBEAT_S
from shared.messages import CONFIRM_MARGIN, ConfirmRequested, PurchaseMessage
from shared.purchases import repository as purchases
from shared.purchases.models import FailReason
from shared.retry import TRANSIENT_DATABASE, until_stopped
from worker import metrics
from worker.decision import DELIVERY_MARGIN, Command
from worker.leases import Lease, LeaseLost
from worker.processor import BatchResult, RecordConflict, VersionConflict, apply_batch

log = logging.getLogger(__name__)

RECORD_CONFLICT_ATTEMPTS = 3
# The API's clock and this worker's may differ a little: a hold is looked for this much early.
HOLD_CLOCK_SLACK = timedelta(seconds=2)
# How long a new consumer waits, unless a delivery reaches it first, before it counts itself
# the queue's active consumer: the broker closes a dead predecessor's connection (returning the
# messages it held to the queue) after two missed heartbeats.
TAKEOVER_GRACE_S = 3 * HEARTBEAT_S
# An idle partition records its progress this often.
IDLE_PROGRESS_S = 1.0
# How long a consumer that stops lets a keep of holds under way finish.
KEEP_GRACE_S = 2.0


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
        # A deque and one future to wake the loop rather than an asyncio.Queue: at one purchase
        # a message, waiting on a queue (a task for its get, one for the drain event, and
        # asyncio.wait over both) cost a sixth of the worker's CPU.
        self._inbox: deque[DeliveredMessage] = deque()
        self._arrival: asyncio.Future[None] | None = None  # what _get waits on, if it waits
        self._channel: AbstractChannel | None = None
        self._amqp: aiormq.abc.AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._draining = False  # stop taking; finish what was delivered
        self._aborted = False  # stop now; unacked messages go back to the queue
        self._task: asyncio.Task[None] | None = None
        self.applied = 0
        self.lost_lease = False
        # How far the partition's commands are applied, and when its earliest hold ends.
        self._horizon: datetime | None = None
        self._next_hold_end: datetime | None = None
        self._delivered = False  # a delivery proves this consumer the queue's active one
        self._started = time.monotonic()
        # Confirmations delivered again, whose holds are kept by the keeper task (see _deliver);
        # those whose purchase had no row yet, kept again by each batch until it has one.
        self._to_keep: list[ConfirmRequested] = []
        self._keeper: asyncio.Task[None] | None = None
        self._keeping = True  # False once stopping: what is delivered then goes back unapplied
        self._keep_after: dict[UUID, ConfirmRequested] = {}

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
        async with self._pool.acquire() as conn:
            self._next_hold_end = await purchases.earliest_hold_end(conn, self.partition)
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
        self._delivered = True
        self._inbox.append(message)
        self._wake()
        if message.redelivered and self._keeping:
            try:
                self._keep_soon(message)
            except Exception:  # a bug: the batch's _kept() finds the holds not kept
                log.exception("partition %d: could not start keeping holds", self.partition)

    def _keep_soon(self, message: DeliveredMessage) -> None:
        """A message delivered again was in the hands of a worker that died or let go of it. It
        may go on dying until the broker dead-letters it, and a confirmation in it must keep its
        hold meanwhile (a drained queue would no longer show it): kept at once, as it arrives,
        in transactions of their own, so that whatever happens to this worker afterwards leaves
        the hold kept."""
        try:
            confirmations = PurchaseMessage.from_body(message.body).confirmations
        except ValidationError:
            return  # dead-lettered by _handle
        if not confirmations:
            return
        self._to_keep += confirmations
        keeper = self._keeper
        if keeper is None or keeper.done():
            if keeper is not None and not keeper.cancelled() and keeper.exception() is not None:
                # Its confirmations went back to _to_keep: this keeper tries them again.
                log.warning("partition %d: keeping holds failed: %r", self.partition, keeper)
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep_delivered(), name=f"keep-holds-{self.partition}"
            )

    async def _keep_delivered(self) -> None:
        while self._to_keep:
            confirmations, self._to_keep = self._to_keep, []
            try:
                holds = await self._keep_holds(confirmations)
            except BaseException:
                self._to_keep[:0] = confirmations  # not kept: for the next try, or the next owner
                raise
            by_purchase = {c.purchase_id: c for c in confirmations}
            for hold in holds:
                if hold.status is None:  # no row yet: its purchase may be in the next batch
                    self._keep_after[hold.purchase_id] = by_purchase[hold.purchase_id]

    async def _kept(self) -> None:
        """Wait until the holds of every confirmation delivered so far are kept; raise if they
        could not be (the batch then stays unapplied, and goes back to the queue)."""
        while (keeper := self._keeper) is not None and not keeper.done():
            await asyncio.wait({keeper})
        if keeper is not None and not keeper.cancelled() and keeper.exception() is not None:
            raise RuntimeError(
                f"partition {self.partition}: the holds of confirmations delivered again could "
                "not be kept"
            ) from keeper.exception()

    def _drain(self) -> None:
        """Take no more: a waiting _get returns what the inbox holds, then nothing."""
        self._draining = True
        self._wake()

    def _wake(self) -> None:
        """Let a waiting _get look again (a delivery came, or draining began)."""
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)

    async def stop(self) -> None:
        """Hand the partition back cleanly: cancel the subscription, apply and ack everything
        already delivered, close the channel. (A quorum queue may deliver after its cancel-ok,
        rabbitmq-server#3729; aiormq drops such a delivery unacked, so it goes back to the queue
        as the channel closes, and the next owner applies it once.)"""
        if self._amqp is not None and self._consumer_tag is not None and not self._aborted:
            try:
                await self._amqp.basic_cancel(self._consumer_tag)
            except Exception as exc:  # channel already gone: its messages are requeued anyway
                log.warning("partition %d: cancel failed: %r", self.partition, exc)
            # Deliveries that raced the cancel reach the inbox on the next loop turns.
            await asyncio.sleep(0.05)
        self._drain()
        if self._task is not None:
            await asyncio.wait({self._task})
        await self._end_keeper()
        await self._close_channel()
        metrics.forget_partition(self.partition)

    async def abort(self) -> None:
        """Stop without acking what is in hand (lease lost, connection lost, shutdown during an
        outage): the broker redelivers it to the partition's next owner."""
        self._aborted = True
        self._drain()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        await self._end_keeper()
        await self._close_channel()
        metrics.forget_partition(self.partition)

    async def _end_keeper(self) -> None:
        """Stop keeping holds, once the keep under way is done (its message may be on its last
        delivery) or has had KEEP_GRACE_S: what was delivered and not applied goes back to the
        queue, and the next owner, to which it is delivered again, keeps the rest."""
        self._keeping = False
        keeper = self._keeper
        if keeper is None:
            return
        await asyncio.wait({keeper}, timeout=KEEP_GRACE_S)
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)

    async def _close_channel(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception as exc:
                log.debug("partition %d: channel close: %r", self.partition, exc)

    async def _run(self) -> None:
        try:
            while True:
                messages = await self._next_batch(self._until_sweep())
                if messages:
                    await self._handle(messages)
                elif self._draining:
                    return
                else:  # nothing came before a hold of the partition fell due
                    self._idle()
                    await self._sweep()
        except LeaseLost:
            self.lost_lease = True
            log.warning(
                "lease lost at commit; leaving the batch unacked",
                extra={"partition": self.partition, "epoch": self.lease.epoch},
            )
        except asyncio.CancelledError:
            if not self._aborted:
                raise
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            # The channel or its connection went (a broker node lost): the worker reconnects,
            # and the broker redelivers the batch to whoever consumes the partition next.
            log.warning(
                "partition %d: broker channel lost (%r); leaving the batch unacked",
                self.partition,
                exc,
            )
        except Exception:
            log.exception(
                "partition %d: consumer failed; leaving the batch unacked", self.partition
            )

    async def _next_batch(self, wait_s: float | None) -> list[DeliveredMessage]:
        """Wait up to `wait_s` (None: for ever) for a first message, then gather more for up to
        BATCH_MAX_WAIT_MS. Empty on that timeout, or once draining with nothing left."""
        first = await self._get(wait_s=wait_s)
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
        if self._inbox:
            return self._inbox.popleft()
        if self._draining or wait_s == 0:
            return None
        loop = asyncio.get_running_loop()
        arrival = self._arrival = loop.create_future()
        timer = None if wait_s is None else loop.call_later(wait_s, self._wake)
        try:
            await arrival
        finally:
            self._arrival = None
            if timer is not None:
                timer.cancel()
        return self._inbox.popleft() if self._inbox else None

    def _observe(self, commands: list[Command], result: BatchResult, seconds: float) -> None:
        self.applied += len(result.decisions)
        metrics.COMMIT_SECONDS.observe(seconds)
        metrics.BATCH_SIZE.observe(len(commands))
        metrics.DUPLICATES.inc(result.duplicates)
        if commands:
            oldest = min(c.accepted_at for c in commands)
            metrics.LAG_SECONDS.labels(str(self.partition)).set(
                max(0.0, (datetime.now(UTC) - oldest).total_seconds())
            )
        for t in result.transitions:
            metrics.decided(t.after.value, t.reason.value if t.reason else "").inc()
        # Counted per (status, reason) once per batch: a labels() lookup per purchase costs more
        # than the purchase's share of the commit.
        decided = Counter(
            (d.status.value, d.reason.value if d.reason else "") for d in result.decisions
        )
        for (status, reason), count in decided.items():
            metrics.decided(status, reason).inc(count)
        if not log.isEnabledFor(logging.INFO):
            return
        for decision in result.decisions:
            reason = decision.reason.value if decision.reason else ""
            log.info(
                "purchase decided",
                extra={
                    "purchase_id": str(decision.purchase.purchase_id),
                    "event_id": str(decision.purchase.event_id),
                    "partition": self.partition,
                    "status": decision.status.value,
                    "reason": reason or None,
                },
            )
        for t in result.transitions:
            log.info(
                f"purchase {t.after.value}",
                extra={
                    "purchase_id": str(t.purchase_id),
                    "event_id": str(t.event_id),
                    "partition": self.partition,
                    "status": t.after.value,
                    "reason": t.reason.value if t.reason else None,
                },
            )

    async def _handle(self, messages: list[DeliveredMessage]) -> None:
        batch: list[tuple[DeliveredMessage, PurchaseMessage]] = []
        for message in messages:
            if message.redelivered:
                metrics.REDELIVERIES.inc()
            try:
                decoded = PurchaseMessage.from_body(message.body)
            except ValidationError:
                # A poison message must not block the partition: dead-letter it (the recorder
                # marks its readable purchase ids failed) and go on with the rest.
                log.error("undecodable message dead-lettered", extra={"partition": self.partition})
                metrics.DEAD_LETTERS.labels(FailReason.UNDECODABLE_MESSAGE.value).inc()
                await self._settle(message, ack=False)
                continue
            if not self._belongs_here(decoded):
                # Sent by a publisher that routes with another PARTITIONS: applying it here would
                # give its event a second writer. Replaying it later routes it right.
                events = sorted({str(command.event_id) for command in decoded.commands})
                log.error(
                    "message of another partition dead-lettered (does its publisher run with "
                    "another PARTITIONS?)",
                    extra={
                        "partition": self.partition,
                        "message_partition": decoded.partition,
                        "event_ids": events,
                        "routes_to": sorted(
                            {self._topology.partition_of(c.event_id) for c in decoded.commands}
                        ),
                        "purchases": len(decoded.commands),
                    },
                )
                await self._dead_letter([(message, decoded)], FailReason.WRONG_PARTITION)
                continue
            batch.append((message, decoded))

        await self._kept()  # before anything of the batch is applied
        set_aside: list[tuple[DeliveredMessage, PurchaseMessage]] = []
        while batch:
            commands = [command for _, decoded in batch for command in decoded.commands]
            # Kept in the batch's own transaction, once its purchases are recorded: the holds of
            # confirmations set aside, and of those delivered again before their purchase had a
            # row (either may name a purchase this batch gives its hold).
            keep = [c for _, decoded in set_aside for c in decoded.confirmations]
            keep += self._keep_after.values()
            started = time.perf_counter()
            try:
                result = await self._apply(commands, keep=keep)
            except RecordConflict as exc:
                # Set the messages of the purchases in conflict aside; apply the rest.
                stuck = [item for item in batch if _touches(item[1], exc.purchase_ids)] or batch
                log.error(
                    "partition %d: %d message(s) dead-lettered after conflicts: %s",
                    self.partition,
                    len(stuck),
                    exc,
                )
                await self._record_set_aside(stuck, FailReason.RECORD_CONFLICT)
                set_aside += stuck
                batch = [item for item in batch if item not in stuck]
                continue
            for hold in result.kept:
                if hold.status is not None:
                    self._keep_after.pop(hold.purchase_id, None)
            _log_kept(self.partition, result.kept)
            try:
                self._observe(commands, result, time.perf_counter() - started)
            except Exception:  # bookkeeping must never stand between a commit and its ack
                log.exception("partition %d: metrics/logging failed", self.partition)
            # Committed, with the set-aside messages' holds kept: they go to the dead-letter
            # exchange now (had the rest not committed, they would go back to the queue with
            # it). Then one ack covers the batch: multiple=True reaches only this channel's
            # deliveries, and every earlier one is in this batch or settled.
            await self._reject(set_aside)
            await self._settle(batch[-1][0], ack=True)
            return
        await self._reject(set_aside)  # nothing left to apply

    def _belongs_here(self, message: PurchaseMessage) -> bool:
        return message.partition == self.partition and all(
            self._topology.partition_of(command.event_id) == self.partition
            for command in message.commands
        )

    async def _drained(self) -> bool:
        """Whether every message of the partition's queue has been delivered to this consumer
        and is in hand or applied: nothing in the inbox, none ready in the queue, and this
        consumer known to be the queue's active one (see _active)."""
        if self._inbox or self._amqp is None or not self._active():
            return False
        try:
            declared = await self._amqp.queue_declare(
                self._topology.queue(self.partition), passive=True
            )
        except Exception as exc:  # channel gone: not known to be drained
            log.debug("partition %d: queue check failed: %r", self.partition, exc)
            return False
        # A quorum queue that cannot tell (its leader busy past the broker's 250 ms, or being
        # elected after a node loss) answers "0 messages, 0 consumers" (RabbitMQ 3.10's
        # rabbit_quorum_queue:stat/2). This consumer is subscribed, so a true reading counts at
        # least it: one that does not is no proof of anything.
        counted = declared.consumer_count is not None and declared.consumer_count > 0
        return counted and declared.message_count == 0 and not self._inbox

    def _active(self) -> bool:
        """Whether this consumer is known to be the queue's active one: a new consumer is not,
        until a delivery reaches it or a predecessor's connection must have been closed by the
        broker (with the messages it held back in the queue): single-active-consumer keeps a
        standby silent."""
        return self._delivered or time.monotonic() >= self._started + TAKEOVER_GRACE_S

    def _idle(self) -> None:
        """Nothing was delivered for a while: nothing of the partition waits, however old the
        last batch was, so its lag is 0 (else it would show a drained backlog's age until the
        next purchase). Not while a new consumer may still be the broker's standby behind a
        dead predecessor, whose messages do wait."""
        if self._active():
            metrics.LAG_SECONDS.labels(str(self.partition)).set(0)

    def _until_sweep(self) -> float:
        """Seconds until the partition's next hold falls due, or until the idle partition next
        records its progress (a pending purchase's wait ahead is measured against it)."""
        if self._next_hold_end is None:
            return IDLE_PROGRESS_S
        due = self._next_hold_end + CONFIRM_MARGIN + DELIVERY_MARGIN
        return min(IDLE_PROGRESS_S, max(0.05, (due - datetime.now(UTC)).total_seconds()))

    def _holds_due(self, commands: list[Command]) -> bool:
        """Whether a hold of the partition may fall due during this batch."""
        if self._next_hold_end is None:
            return False
        latest = max([datetime.now(UTC), *(c.accepted_at for c in commands)])
        return self._next_hold_end + CONFIRM_MARGIN < latest + HOLD_CLOCK_SLACK

    async def _sweep(self) -> None:
        """While no message comes: expire the holds that fell due, and record that everything
        accepted until now is decided."""
        started = time.perf_counter()
        result = await self._apply([])
        if not result.transitions:
            return  # nothing expired: not a batch worth counting
        try:
            self._observe([], result, time.perf_counter() - started)
        except Exception:
            log.exception("partition %d: metrics/logging failed", self.partition)

    async def _apply(
        self, commands: list[Command], *, keep: Sequence[ConfirmRequested] = ()
    ) -> BatchResult:
        """Commit the batch, retrying transient faults for as long as this consumer runs, and
        a record conflict a few times (a retry normally skips the purchase recorded meanwhile)."""
        for attempt in range(1, RECORD_CONFLICT_ATTEMPTS + 1):
            try:
                async for retry in until_stopped(
                    (*TRANSIENT_DATABASE, VersionConflict), lambda: self._aborted
                ):
                    with retry:
                        result = await apply_batch(
                            self._pool,
                            self.lease,
                            commands,
                            horizon=self._horizon,
                            # The progress an idle partition shows says everything accepted
                            # until a moment ago is decided: not so behind a dead predecessor.
                            idle=not self._inbox and self._active(),
                            verify_drained=self._drained,
                            holds_due=self._holds_due(commands),
                            keep=keep,
                        )
                self._horizon = result.horizon
                if result.holds_changed:
                    self._next_hold_end = result.next_hold_end
                return result
            except RecordConflict as exc:
                log.warning(
                    "partition %d: %s (attempt %d of %d)",
                    self.partition,
                    exc,
                    attempt,
                    RECORD_CONFLICT_ATTEMPTS,
                )
                if attempt == RECORD_CONFLICT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def _keep_holds(
        self, confirmations: list[ConfirmRequested]
    ) -> list[purchases.HoldOfConfirmation]:
        """Keep the holds `confirmations` would confirm from expiring."""
        async for retry in until_stopped(TRANSIENT_DATABASE, lambda: self._aborted):
            with retry:
                async with self._pool.acquire() as conn, conn.transaction():
                    holds = await purchases.keep_holds(conn, confirmations)
        _log_kept(self.partition, holds)
        return holds

    async def _dead_letter(
        self, messages: list[tuple[DeliveredMessage, PurchaseMessage]], reason: FailReason
    ) -> None:
        """Set the messages aside and reject them to the dead-letter exchange, where they are
        kept for replay."""
        await self._record_set_aside(messages, reason)
        await self._reject(messages)

    async def _record_set_aside(
        self, messages: list[tuple[DeliveredMessage, PurchaseMessage]], reason: FailReason
    ) -> None:
        """Record the messages' purchases failed with `reason` (never over a decision), and keep
        the holds their confirmations would confirm."""
        metrics.DEAD_LETTERS.labels(reason.value).inc(len(messages))
        failed = [purchase for _, decoded in messages for purchase in decoded.purchases]
        confirmations = [c for _, decoded in messages for c in decoded.confirmations]
        async for retry in until_stopped(TRANSIENT_DATABASE, lambda: self._aborted):
            with retry:
                async with self._pool.acquire() as conn, conn.transaction():
                    await purchases.record_failed_purchases(
                        conn, failed, reason=reason, partition=self.partition
                    )
                    holds = await purchases.keep_holds(conn, confirmations)
        _log_kept(self.partition, holds)

    async def _reject(self, messages: list[tuple[DeliveredMessage, PurchaseMessage]]) -> None:
        for message, _ in messages:
            await self._settle(message, ack=False)

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


def _log_kept(partition: int, holds: list[purchases.HoldOfConfirmation]) -> None:
    kept_now = [str(hold.purchase_id) for hold in holds if hold.kept_now]
    if kept_now:
        log.warning(
            "partition %d: %d hold(s) kept for a confirmation that may be dead-lettered",
            partition,
            len(kept_now),
            extra={"purchase_ids": kept_now},
        )


def _touches(message: PurchaseMessage, purchase_ids: set[UUID]) -> bool:
    return any(command.purchase_id in purchase_ids for command in message.commands)
