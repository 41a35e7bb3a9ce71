"""Publishes accepted purchases to their partition queue and waits for the broker's confirm.

Each partition has a sender: one task that sends its purchases in the order they were accepted,
as messages of up to `max_batch` purchases, with up to the window's size of them in flight
(shared/in_flight.py: one while the CPU is busy, more while confirms are what purchases wait
for). Purchases that arrive while the window is full queue up and go out together in the next
message, so a flood costs one publish and one confirm per many purchases. When a slot is free,
the sender still lingers, as a Kafka producer does, while purchases keep arriving: it gives the
loop's other ready work a turn, and sends once a turn brings no new purchase (or after
`linger_s`). A message costs the process more CPU than a whole request (its frames, a socket
write that wakes the broker, a confirm read through two of aiormq's tasks), so under a flood
fewer, fuller messages leave the CPU to requests; a lone purchase waits one turn of the loop.
But while none of the partition's messages is in flight and the process has CPU to spare, a
message goes out as soon as it holds `full_batch` purchases, from the request that fills it: see
`full_batch`.

Every message is written when its purchases are taken from the queue (shared/amqp_publish.py
writes it to the socket then, or queues it behind frames already waiting), so messages leave in
the order they were taken, whichever of the sender and a request took them.

Each caller returns only once the message holding its purchase is confirmed. Messages of one
partition go out in order on one channel, and RabbitMQ keeps a channel's order, so the queue
holds purchases in the order they were accepted.

A purchase still waiting to be sent when the publish timeout has passed is refused (503) rather
than sent: behind a stalled broker, a deep queue of waiters would otherwise wait one timeout per
message ahead of it. So no caller waits more than about twice the timeout.
"""

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq.exceptions import ChannelInvalidStateError
from prometheus_client import Counter, Gauge, Histogram

from shared.amqp_publish import ConfirmedPublisher
from shared.broker import Topology, declare_topology, queue_depth
from shared.broker_nodes import socket_of
from shared.errors import BrokerUnavailable, QueueFull, ServiceUnavailable
from shared.in_flight import InFlightWindow
from shared.messages import CONTENT_TYPE, MESSAGE_TYPE, Accepted, encode_message

log = logging.getLogger(__name__)

PUBLISHES = Counter(
    "ticketing_publishes_total",
    "Messages published (of purchases, confirmations, cancellations), by broker answer",
    ["outcome"],  # confirmed | nacked | timed_out | unroutable | failed
)
EXPIRED_PURCHASES = Counter(
    "ticketing_publish_expired_total",
    "Commands (purchases, confirmations, cancellations) refused unsent (503): they waited "
    "the whole publish timeout for their turn",
)
PUBLISHED_PURCHASES = Counter(
    "ticketing_published_purchases_total",
    "Commands (purchases, confirmations, cancellations) in confirmed messages",
)
IN_FLIGHT_WINDOW = Gauge(
    "ticketing_publish_in_flight_window",
    "Messages a partition may have in flight now (one while the CPU is busy, more while "
    "purchases wait on confirms)",
)
CONFIRM_SECONDS = Histogram(
    "ticketing_publish_confirm_seconds",
    "From a message's publish to the broker's confirm",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
MESSAGE_PURCHASES = Histogram(
    "ticketing_publish_message_purchases",
    "Commands (purchases, confirmations, cancellations) coalesced into one message",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


# How long a nack's cause (a full queue, or a leader election) is looked for.
NACK_CHECK_S = 0.5
# A nacked partition queue holding at least this share of QUEUE_MAX_LENGTH counts as full.
FULL_SHARE = 0.9
# A publishing channel is replaced at most this often, after a nack or once the broker closed
# it (see _renew_soon).
RENEW_CHANNEL_S = 1.0

_OUTCOME = {
    outcome: PUBLISHES.labels(outcome)
    for outcome in ("confirmed", "nacked", "timed_out", "unroutable", "failed")
}


def _message_ids() -> Iterator[str]:
    """A message id per message, unique in this process and (by a random prefix drawn once, not a
    system call per message) across processes: the channel matches a returned (unroutable) message
    to its publish by it. A forked child would repeat its parent's ids, which is harmless: the
    match is made per channel, and a child never shares its parent's."""
    prefix = secrets.token_hex(8)
    return (f"{prefix}-{n}" for n in itertools.count())


_MESSAGE_IDS = _message_ids()


@dataclass(slots=True)
class _Waiting:
    command: Accepted
    confirmed: asyncio.Future[None]
    since: float  # loop time it started waiting
    deadline: float | None = None  # loop time its confirm must be back by, if sooner


class PurchasePublisher:
    def __init__(
        self,
        topology: Topology,
        *,
        timeout_s: float,
        max_batch: int = 256,
        full_batch: int = 32,
        max_in_flight: int = 8,
        linger_s: float = 0.001,
        window: InFlightWindow | None = None,
    ) -> None:
        self._topology = topology
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        # While no message of a partition is in flight and the process has CPU to spare (the
        # window's `spare`), one of this many purchases goes out as the last of them is handed
        # over, not at the end of the loop's turn. A turn of a flood is
        # every request that arrived since the last, and with nothing in flight they are all a
        # crowd has outstanding (a closed loop: one confirm answered them all, and they came
        # back together): sent as one message at the turn's end, they would leave the CPU idle
        # for its confirm. So the broker confirms this one while the rest are still being read,
        # and the crowd splits into two clumps that take turns, one read while the other is
        # confirmed; with a message in flight already, the turn's purchases go at its end, in
        # as few messages as before.
        self.full_batch = full_batch
        self.linger_s = linger_s
        self.window = window or InFlightWindow(maximum=max_in_flight)
        self._senders: dict[int, _PartitionSender] = {}
        self._channel: AbstractChannel | None = None
        self._connection: AbstractConnection | None = None
        self._renewed_at = float("-inf")  # loop time a new channel was last asked for
        self._renewing: asyncio.Task[None] | None = None  # a new channel opened in the background
        self._retiring: set[asyncio.Task[None]] = set()
        self._confirmed: ConfirmedPublisher | None = None  # writes on the current channel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._declared = False  # the topology, bindings included, on some connection before
        self._proven = _Proven()
        # Told when a message was not confirmed in time (the connection's owner checks its node).
        self.on_unconfirmed: Callable[[], None] | None = None
        # partition -> when its queue's depth was last read after a nack, and that reading
        self._fullness: dict[int, tuple[float, asyncio.Task[bool]]] = {}

    async def start(self, connection: AbstractConnection) -> None:
        """Declare the topology and publish on a new channel of `connection` from now on (again
        after each reconnect, without binding again what exists: see
        shared/broker_nodes.BrokerLink and broker.declare_topology)."""
        rebind, self._declared = not self._declared, False  # until this one is whole
        await declare_topology(connection, self._topology, rebind=rebind)
        self._declared = True
        channel, publisher = await self._open_channel(connection)
        self._channel, self._confirmed, self._connection = channel, publisher, connection

    def detach(self) -> None:
        """The connection was given up while it still looks open (a node that answers nothing):
        publish nothing more on it, and answer 503 at once until start() brings the next one."""
        channel, self._channel, self._connection = self._channel, None, None
        if channel is not None:
            self._retire(channel, after_s=0.0)

    async def _open_channel(
        self, connection: AbstractConnection
    ) -> tuple[AbstractChannel, ConfirmedPublisher]:
        """A publishing channel, and what writes messages on it: on the channel underneath,
        frames written by shared/amqp_publish.py (aio-pika's wrappers and aiormq's basic_publish
        cost most of a message), straight to the connection's socket where it is known."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        amqp = cast(aiormq.Channel, await channel.get_underlay_channel())
        publisher = ConfirmedPublisher(
            amqp,
            exchange=self._topology.exchange,
            content_type=CONTENT_TYPE,
            message_type=MESSAGE_TYPE,
            socket=socket_of(connection),
        )
        return channel, publisher

    def _renewal_due(self) -> AbstractConnection | None:
        """The connection to open a new channel on, if one may be opened now: at most once a
        second, and never on a connection that is closed (its replacement opens a channel of
        its own: see start)."""
        loop = asyncio.get_running_loop()
        connection = self._connection
        if connection is None or connection.is_closed:
            return None
        if loop.time() - self._renewed_at < RENEW_CHANNEL_S:
            return None
        self._renewed_at = loop.time()
        return connection

    def _renew_soon(self) -> None:
        """Open a new channel in the background, at most once a second, and publish on it once
        it is open; nobody waits for it. Called after a nack, and when the broker closed the
        channel while the connection stays up (a publish to an exchange that was deleted is
        closed with 404): nothing else would open another. Meanwhile publishes go on: to the
        channel as it is, or refused at once if it is closed."""
        if self._renewing is not None or (connection := self._renewal_due()) is None:
            return
        self._renewing = asyncio.get_running_loop().create_task(
            self._renew_channel(connection), name="publish-channel"
        )
        self._renewing.add_done_callback(self._renewed)

    def _renewed(self, renewing: "asyncio.Task[None]") -> None:
        if self._renewing is renewing:
            self._renewing = None

    async def _renew_channel(self, connection: AbstractConnection) -> None:
        """Publish on a new channel of `connection` from now on. The old one is closed once the
        messages in flight on it had their whole timeout to be confirmed."""
        try:
            async with asyncio.timeout(self.timeout_s):
                channel, publisher = await self._open_channel(connection)
        except Exception as exc:  # the connection is going: its reconnect opens a channel
            log.warning("could not open a new publishing channel: %r", exc)
            return
        if connection is not self._connection:  # replaced meanwhile, with a channel of its own
            self._retire(channel, after_s=0.0)
            return
        old, self._channel, self._confirmed = self._channel, channel, publisher
        if old is not None:
            self._retire(old, after_s=self.timeout_s)

    def _retire(self, channel: AbstractChannel, *, after_s: float) -> None:
        retiring = asyncio.get_running_loop().create_task(_close_quietly(channel, after_s=after_s))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        # No channel may be opened once closed: forgetting the connection also keeps a publish
        # that comes later (a request during shutdown) from asking for a new one.
        self._connection = None
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        for retiring in self._retiring:
            retiring.cancel()
        for _, reading in self._fullness.values():
            reading.cancel()
        for sender in self._senders.values():
            await sender.stop()
        self._senders.clear()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    @property
    def is_ready(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    def check_ready(self) -> bool:
        """Whether purchases can be published now; if not because the broker closed the
        channel, a new one is opened meanwhile. A readiness probe calls this: a replica that is
        not ready is sent no purchase, so no publish would ever open it."""
        if self.is_ready:
            return True
        self._renew_soon()
        return False

    def partition_of(self, command: Accepted) -> int:
        return self._topology.partition_of(command.event_id)

    def publish(self, command: Accepted, *, deadline: float | None = None) -> Awaitable[None]:
        """Hand the command to its partition's sender; what this returns is done once the
        broker confirmed it (by `deadline`, a loop time, if given), and raises
        ServiceUnavailable otherwise. (A plain function returning the sender's future: a
        coroutine here would be one more frame to resume per purchase when the confirm comes.)"""
        partition = self.partition_of(command)
        sender = self._senders.get(partition)
        if sender is None or sender.failed:  # a sender that hit a bug is replaced
            sender = self._senders[partition] = _PartitionSender(self, partition)
        # The message is sent by the partition's sender, so a caller that gives up (client
        # gone) cancels only its own wait, never its neighbours' publish.
        return sender.submit(command, deadline)

    def write(self, partition: int, commands: list[Accepted]) -> Coroutine[Any, Any, None]:
        """Publish one message of `commands` now: its frames are written before this returns,
        or queued behind frames still waiting to be (shared/amqp_publish.py). What this returns
        is done once the broker confirmed the message, and raises ServiceUnavailable otherwise,
        as does this."""
        channel, publisher = self._channel, self._confirmed
        if channel is None or channel.is_closed or publisher is None:
            self._renew_soon()
            raise BrokerUnavailable("The message broker connection is down; retry shortly.")
        body = encode_message(partition, commands)
        started = time.perf_counter()
        # The deadline covers the whole publish, frames and confirm: the expiry bound relies on
        # it.
        deadline = self._event_loop().time() + self.timeout_s
        routing_key, message_id = self._topology.routing_key(partition), next(_MESSAGE_IDS)
        try:
            confirmation = publisher.publish(routing_key, body, message_id)
        except ChannelInvalidStateError as exc:  # closed under it
            _OUTCOME["failed"].inc()
            log.warning("publish failed (partition %d): %r", partition, exc)
            raise BrokerUnavailable("The message broker is unavailable; retry shortly.") from exc
        return self._confirm(partition, len(commands), channel, confirmation, started, deadline)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time (Python 3.11).
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def _confirm(
        self,
        partition: int,
        count: int,
        channel: AbstractChannel,
        confirmation: "asyncio.Future[Any]",
        started: float,
        deadline: float,
    ) -> None:
        """Wait for a written message's confirm, by `deadline` (a loop time)."""
        try:
            async with asyncio.timeout_at(deadline):
                await confirmation
        except PublishError as exc:  # returned: no queue bound for the partition
            _OUTCOME["unroutable"].inc()
            log.error("purchase message unroutable (partition %d): %s", partition, exc)
            raise BrokerUnavailable("The purchase could not be queued; retry shortly.") from exc
        except DeliveryError as exc:
            # Nacked: the partition queue is full (reject-publish), or, on a cluster, it is
            # electing a new leader. RabbitMQ 3.10 nacks, for good, a channel whose first
            # publish to a quorum queue came during the election; a new channel gets through.
            # Its callers are answered within NACK_CHECK_S, not after the new channel opens:
            # the bound on a caller's wait (about twice the timeout) leaves no room for that.
            _OUTCOME["nacked"].inc()
            self._renew_soon()
            if await self._queue_full(partition):
                raise QueueFull(
                    "Too many purchases are waiting for this event; retry shortly.",
                    retry_after_s=2,
                ) from exc
            raise BrokerUnavailable(
                "This event's queue is moving to another broker node; retry shortly."
            ) from exc
        except TimeoutError as exc:
            _OUTCOME["timed_out"].inc()
            # As after a nack: a channel whose first publish to a quorum queue found no leader
            # (a reconnect while the leader's node hangs) is never confirmed for that queue
            # again (RabbitMQ 3.10), though a new one is. A channel that had a confirm from the
            # queue is kept: it is confirmed again once the queue has a leader, where a new
            # channel would only start over.
            if channel is self._channel:  # not one replaced since, on a node left since
                if not self._proven.confirmed(channel, partition):
                    self._renew_soon()
                if self.on_unconfirmed is not None:
                    self.on_unconfirmed()
            raise BrokerUnavailable(
                "The message broker did not confirm the purchase in time; retry with the same "
                "Idempotency-Key."
            ) from exc
        except Exception as exc:  # connection or channel lost mid-publish
            _OUTCOME["failed"].inc()
            log.warning("publish failed (partition %d): %r", partition, exc)
            raise BrokerUnavailable("The message broker is unavailable; retry shortly.") from exc
        CONFIRM_SECONDS.observe(time.perf_counter() - started)
        if channel is self._channel:
            self._proven.add(channel, partition)
        _OUTCOME["confirmed"].inc()
        PUBLISHED_PURCHASES.inc(count)
        MESSAGE_PURCHASES.observe(count)

    async def _queue_full(self, partition: int) -> bool:
        """Whether the partition's queue is full, or nearly (workers may have taken some since
        it refused): else the nack came from a leader election. A queue that refuses refuses
        every message, so one reading serves the nacks of NACK_CHECK_S."""
        loop = asyncio.get_running_loop()
        reading = self._fullness.get(partition)
        if reading is None or loop.time() - reading[0] > NACK_CHECK_S:
            task = loop.create_task(self._read_fullness(partition), name="queue-fullness")
            reading = self._fullness[partition] = (loop.time(), task)
        # Shielded: a caller that gives up does not cancel the others' reading.
        return await asyncio.shield(reading[1])

    async def _read_fullness(self, partition: int) -> bool:
        """Asked on a channel of its own, within NACK_CHECK_S: a queue electing a leader may not
        answer, and aiormq closes the channel of an RPC that timed out (never the publishing one,
        with every message in flight on it)."""
        connection = self._connection
        if connection is None or connection.is_closed:
            return False
        channel: AbstractChannel | None = None
        try:
            async with asyncio.timeout(NACK_CHECK_S):
                channel = await connection.channel()
                ready = await queue_depth(channel, self._topology.queue(partition))
        except Exception:  # not answered in time, or the connection went meanwhile
            return False
        finally:
            if channel is not None and not channel.is_closed:
                self._retire(channel, after_s=0.0)
        return ready >= FULL_SHARE * self._topology.max_length


class _Proven:
    """The partitions whose queues have confirmed a message on the publishing channel."""

    __slots__ = ("_channel", "_partitions")

    def __init__(self) -> None:
        self._channel: AbstractChannel | None = None
        self._partitions: set[int] = set()

    def add(self, channel: AbstractChannel, partition: int) -> None:
        if channel is not self._channel:
            self._channel, self._partitions = channel, set()
        self._partitions.add(partition)

    def confirmed(self, channel: AbstractChannel, partition: int) -> bool:
        return channel is self._channel and partition in self._partitions


class _PartitionSender:
    """Sends one partition's purchases: in acceptance order, as few messages as the window
    allows, failing every caller whose purchase cannot be confirmed."""

    def __init__(self, publisher: PurchasePublisher, partition: int) -> None:
        self._publisher = publisher
        self._partition = partition
        self._pending: deque[_Waiting] = deque()
        # Each message in flight: the task awaiting its confirm, its callers, and that confirm.
        self._in_flight: dict[
            asyncio.Task[None], tuple[list[_Waiting], Coroutine[Any, Any, None]]
        ] = {}
        self._changed = asyncio.Event()
        self._deadlines = 0  # callers waiting with a deadline of their own
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time (Python 3.11).
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"publish-{partition}")

    def submit(self, command: Accepted, deadline: float | None) -> asyncio.Future[None]:
        loop = self._loop
        waiting = _Waiting(command, loop.create_future(), loop.time(), deadline)
        pending = self._pending
        pending.append(waiting)
        if deadline is not None:
            self._deadlines += 1
            waiting.confirmed.add_done_callback(self._deadline_done)
        window = self._publisher.window
        if len(self._in_flight) >= window.size:
            # Nothing can go out before a confirm, which wakes the sender: no turn for nothing.
            window.waited()
        elif window.spare and not self._in_flight and len(pending) >= self._publisher.full_batch:
            # A full message while none is in flight: it goes now, and is confirmed while this
            # turn's other requests are still being read (see `full_batch`).
            self._dispatch(self._take())
        else:
            self._changed.set()
        return waiting.confirmed

    def _deadline_done(self, _: asyncio.Future[None]) -> None:
        self._deadlines -= 1

    @property
    def failed(self) -> bool:
        return self._task.done()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        """Refuse what waited too long, send what the window allows, sleep until a purchase
        arrives or a message is confirmed; again."""
        window = self._publisher.window
        shown = 0
        try:
            while True:
                self._expire()
                size = window.adapt()
                if self._pending and len(self._in_flight) < size:
                    await self._linger()
                while self._pending and len(self._in_flight) < size:
                    self._dispatch(self._take())
                if self._pending:
                    window.waited()
                if size != shown:
                    IN_FLIGHT_WINDOW.set(size)
                    shown = size
                self._changed.clear()
                await self._changed.wait()
        except asyncio.CancelledError:  # shutting down: no caller may wait for ever
            for task in self._in_flight:
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            # A task cancelled before it began never ran its own answer: answered here.
            for batch, confirmed in self._in_flight.values():
                confirmed.close()
                self._settled(batch, BrokerUnavailable("The API is shutting down."))
            for waiting in self._pending:
                _fail(waiting.confirmed, BrokerUnavailable("The API is shutting down."))
            raise
        except Exception:  # a bug: logged here, since nobody awaits this task
            log.exception("publisher of partition %d failed", self._partition)
            for waiting in self._pending:
                _fail(waiting.confirmed, BrokerUnavailable("The purchase could not be queued."))

    async def _linger(self) -> None:
        """Give the loop's other ready work turns while each brings more purchases, up to the
        publisher's linger_s or a full message: under a flood those turns are requests on
        their way here, and they join this message instead of needing one of their own."""
        publisher = self._publisher
        until = self._loop.time() + publisher.linger_s
        seen = len(self._pending)
        while seen < publisher.max_batch and self._loop.time() < until:
            await asyncio.sleep(0)  # one turn: what is ready now runs first
            if len(self._pending) == seen:
                return
            seen = len(self._pending)

    def _take(self) -> list[_Waiting]:
        """The next message's purchases, oldest first. A caller cancelled before its purchase
        went out never sees a 202: its purchase is dropped, not bought."""
        batch: list[_Waiting] = []
        while self._pending and len(batch) < self._publisher.max_batch:
            waiting = self._pending.popleft()
            if not waiting.confirmed.done():
                batch.append(waiting)
        return batch

    def _expire(self) -> None:
        """Refuse, unsent, the purchases that waited their whole timeout for a turn (oldest
        first: the queue is in arrival order)."""
        now = self._loop.time()
        deadline = now - self._publisher.timeout_s
        while self._pending and self._pending[0].since <= deadline:
            waiting = self._pending.popleft()
            if waiting.confirmed.done():  # cancelled: its caller is gone
                continue
            EXPIRED_PURCHASES.inc()
            _fail(
                waiting.confirmed,
                BrokerUnavailable(
                    "The message broker is not confirming purchases in time; retry shortly."
                ),
            )
        if self._deadlines:  # some wait with a deadline of their own (confirmations)
            for waiting in self._pending:
                if waiting.deadline is not None and now > waiting.deadline:
                    _fail(waiting.confirmed, _too_late())

    def _dispatch(self, batch: list[_Waiting]) -> None:
        """Write the message of `batch` now (so messages leave in the order they were taken),
        and wait for its confirm in a task of its own."""
        if not batch:
            return
        try:
            confirmed = self._publisher.write(
                self._partition, [waiting.command for waiting in batch]
            )
        except ServiceUnavailable as exc:
            self._settled(batch, exc)
            return
        except Exception:  # a bug: logged here, where no caller's traceback shows it
            log.exception("publishing to partition %d failed unexpectedly", self._partition)
            self._settled(batch, BrokerUnavailable("The purchase could not be queued."))
            return
        task = self._loop.create_task(self._settle(batch, confirmed))
        self._in_flight[task] = (batch, confirmed)

    async def _settle(self, batch: list[_Waiting], confirmed: Coroutine[Any, Any, None]) -> None:
        outcome: ServiceUnavailable | None = None
        try:
            await confirmed
        except ServiceUnavailable as exc:
            outcome = exc
        except asyncio.CancelledError:
            outcome = BrokerUnavailable("The API is shutting down.")
            raise
        except Exception:  # a bug: logged here, since nobody awaits this task
            log.exception("publishing to partition %d failed unexpectedly", self._partition)
            outcome = BrokerUnavailable("The purchase could not be queued.")
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._in_flight.pop(task, None)
            self._settled(batch, outcome)

    def _settled(self, batch: list[_Waiting], outcome: ServiceUnavailable | None) -> None:
        """Answer the callers of a message confirmed, or failed with `outcome`. Its slot is
        free: the sender is woken first, so the next message goes out before these callers
        (woken next) spend the CPU on their answers."""
        self._changed.set()
        now = self._loop.time()
        for waiting in batch:
            if outcome is not None:
                _fail(waiting.confirmed, outcome)
            elif waiting.deadline is not None and now > waiting.deadline:
                _fail(waiting.confirmed, _too_late())
            elif not waiting.confirmed.done():
                waiting.confirmed.set_result(None)


async def _close_quietly(channel: AbstractChannel, *, after_s: float) -> None:
    await asyncio.sleep(after_s)
    with contextlib.suppress(Exception):
        await channel.close()


def _too_late() -> BrokerUnavailable:
    return BrokerUnavailable(
        "The message broker did not confirm this in time for the purchase's hold; retry (the "
        "status shows whether it was applied)."
    )


def _fail(confirmed: asyncio.Future[None], exc: ServiceUnavailable) -> None:
    if not confirmed.done():
        confirmed.set_exception(exc)
        confirmed.exception()  # its caller may be gone; don't warn
