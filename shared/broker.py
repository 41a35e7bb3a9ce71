"""RabbitMQ topology, declared in this one place (connections: shared/broker_nodes.py).

    purchases (direct) --"<p>"--> <ns>.purchases.<p>   quorum, single active consumer, one per partition
          | dead letters (rejected by a worker, or past the delivery limit)
          v
    purchases.dlx (fanout) --> <ns>.purchases.dead-letter         kept for inspection and replay
                           --> <ns>.purchases.dead-letter.record  read by workers to mark purchases failed

The routing key is the event's partition, from a stable hash of the event id, so every purchase of
one event lands in one queue in the order the API accepted it. Every queue is a quorum queue,
replicated over QUORUM_REPLICAS nodes of a cluster, its leader placed on the node with the fewest.
"""

import logging
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from shared.errors import StartupError
from shared.messages import CONTENT_TYPE, MESSAGE_TYPE
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Topology:
    namespace: str
    partitions: int
    max_length: int
    delivery_limit: int
    quorum_replicas: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> "Topology":
        return cls(
            namespace=settings.broker_namespace,
            partitions=settings.partitions,
            max_length=settings.queue_max_length,
            delivery_limit=settings.delivery_limit,
            quorum_replicas=settings.quorum_replicas,
        )

    @property
    def exchange(self) -> str:
        return f"{self.namespace}.purchases"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.purchases.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.purchases.dead-letter"

    @property
    def dead_letter_record_queue(self) -> str:
        return f"{self.namespace}.purchases.dead-letter.record"

    def queue(self, partition: int) -> str:
        return f"{self.namespace}.purchases.{partition}"

    @staticmethod
    def routing_key(partition: int) -> str:
        return str(partition)

    def partition_of(self, event_id: UUID) -> int:
        # crc32, not hash(): Python salts str/bytes hashes per process, and every API replica
        # must route one event to one queue.
        return zlib.crc32(event_id.bytes) % self.partitions

    def placement_arguments(self) -> dict[str, Any]:
        """Where a new queue's replicas and leader go. They only count when the queue is
        created, so a queue declared before them keeps its own (see _declare_queue)."""
        return {
            "x-quorum-initial-group-size": self.quorum_replicas,
            # Leaders spread over the nodes (the fewest leaders first), not all on the node
            # the declaring client happens to be connected to.
            "x-queue-leader-locator": "balanced",
        }

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum", **self.placement_arguments()}

    def partition_queue_arguments(self) -> dict[str, Any]:
        return {
            **self.placement_arguments(),
            "x-queue-type": "quorum",
            # The lease table spreads partitions; this is the broker's backstop that never lets
            # two consumers read one partition at once.
            "x-single-active-consumer": True,
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            # at-least-once: a dead letter is not lost between the two queues.
            "x-dead-letter-strategy": "at-least-once",
            # A quorum queue admits one message past x-max-length before it refuses, so this
            # asks for one less: QUEUE_MAX_LENGTH is then exactly what a queue holds.
            "x-max-length": self.max_length - 1,
            # A full queue refuses (nacks) the publish, so the API answers 503, never drops.
            "x-overflow": "reject-publish",
        }


class TopologyMismatch(StartupError):
    """A queue or exchange exists with other arguments than these settings ask for."""


async def declare_topology(
    connection: AbstractConnection, topology: Topology, *, rebind: bool = True
) -> None:
    """Declare every exchange, queue and binding (idempotent), each queue on a channel of its
    own: the broker closes a channel whose declaration it refuses.

    rebind=False is for a reconnect after a declaration that completed: a queue that exists, on
    an exchange that exists, keeps the binding that declaration made, and is not bound again.
    A binding is a transaction over every node of a cluster, so it waits for a node that is
    frozen (a hung host, a stopped VM) until the cluster gives that node up, a minute by default
    (net_ticktime): measured 73 s, against milliseconds for re-declaring an exchange or a queue
    that exists."""
    existing = set() if rebind else await _existing(connection, topology)
    channel = await connection.channel()
    try:
        exchange = await channel.declare_exchange(
            topology.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dlx = await channel.declare_exchange(
            topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        for name in (topology.dead_letter_queue, topology.dead_letter_record_queue):
            await _declare_queue(connection, name, topology.dead_letter_queue_arguments())
            if not {name, topology.dead_letter_exchange} <= existing:
                await (await channel.get_queue(name, ensure=False)).bind(dlx)
        for partition in range(topology.partitions):
            name = topology.queue(partition)
            await _declare_queue(connection, name, topology.partition_queue_arguments())
            if not {name, topology.exchange} <= existing:
                queue = await channel.get_queue(name, ensure=False)
                await queue.bind(exchange, routing_key=topology.routing_key(partition))
    finally:
        if not channel.is_closed:
            await channel.close()


async def _existing(connection: AbstractConnection, topology: Topology) -> set[str]:
    """The names of the topology's exchanges and queues that exist (passive declarations: a
    look-up on the node connected to, never a cluster-wide transaction)."""
    exchanges = (topology.exchange, topology.dead_letter_exchange)
    queues = (
        topology.dead_letter_queue,
        topology.dead_letter_record_queue,
        *(topology.queue(partition) for partition in range(topology.partitions)),
    )
    found: set[str] = set()
    channel = await connection.channel()
    try:
        for name in (*exchanges, *queues):
            try:
                if name in exchanges:
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                channel = await connection.channel()  # a 404 closes the channel
                continue
            found.add(name)
    finally:
        if not channel.is_closed:
            await channel.close()
    return found


# Arguments that only decide where a new queue's replicas and leader go: a queue declared
# without them (before QUORUM_REPLICAS existed) or with other values keeps its own.
PLACEMENT_ARGUMENTS = ("x-quorum-initial-group-size", "x-queue-leader-locator")
# RabbitMQ's words for a refused re-declaration, e.g. "inequivalent arg 'x-max-length' for queue
# 'q' in vhost '/': received '6' but current is '5'" or "... current is none".
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)'.*but current is "
    r"(?:none|the value '(?P<value>[^']*)' of type '(?P<type>[^']+)'|'(?P<plain>[^']*)')"
)


async def _declare_queue(
    connection: AbstractConnection, name: str, arguments: dict[str, Any]
) -> None:
    """Declare a quorum queue; one that exists with other placement arguments is kept as it
    is (logged), one with any other difference is a TopologyMismatch."""
    wanted = dict(arguments)
    for _ in range(len(PLACEMENT_ARGUMENTS) + 1):
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, durable=True, arguments=wanted)
        except ChannelPreconditionFailed as exc:
            found = _INEQUIVALENT.search(str(exc))
            if found is None or found["arg"] not in PLACEMENT_ARGUMENTS:
                raise TopologyMismatch(
                    f"{_difference(name, found, wanted) or exc}. RabbitMQ cannot change a "
                    "queue's arguments in place: keep the earlier setting (PARTITIONS, "
                    "QUEUE_MAX_LENGTH, DELIVERY_LIMIT), or move the queued purchases to new "
                    "queues (README, 'Moving queues to new arguments'), or use another "
                    "BROKER_NAMESPACE."
                ) from exc
            _adopt(wanted, found)
            continue
        finally:
            if not channel.is_closed:
                await channel.close()
        kept = {k: wanted.get(k) for k in PLACEMENT_ARGUMENTS if wanted.get(k) != arguments[k]}
        if kept:
            log.warning(
                "queue %s keeps the placement it was created with (%s); see README, 'Moving "
                "queues to new arguments', to give it QUORUM_REPLICAS=%s",
                name,
                ", ".join(f"{k}={v if v is not None else 'none'}" for k, v in kept.items()),
                arguments["x-quorum-initial-group-size"],
            )
        return
    raise TopologyMismatch(f"queue {name} could not be declared with its placement arguments")


# The settings behind queue arguments, each with how an argument's value reads as the setting.
_SETTINGS_OF: dict[str, tuple[str, Callable[[str | int], int]]] = {
    # One more than the argument: see partition_queue_arguments.
    "x-max-length": ("QUEUE_MAX_LENGTH", lambda value: int(value) + 1),
    "x-delivery-limit": ("DELIVERY_LIMIT", int),
}


def _difference(name: str, found: re.Match[str] | None, wanted: dict[str, Any]) -> str | None:
    """The refused argument as the setting it comes from, in the operator's numbers (RabbitMQ's
    words give the argument's, which for x-max-length is one less than the setting)."""
    # (A dead-letter queue takes neither setting: one declared with either is told in RabbitMQ's
    # words, as any other argument.)
    if found is None or found["arg"] not in _SETTINGS_OF or found["arg"] not in wanted:
        return None
    setting, as_setting = _SETTINGS_OF[found["arg"]]
    current = found["value"] if found["value"] is not None else found["plain"]
    was = "none" if current is None else as_setting(current)
    return (
        f"queue {name!r} exists with {setting}={was} ({found['arg']}), and these settings ask "
        f"for {setting}={as_setting(wanted[found['arg']])}"
    )


def _adopt(wanted: dict[str, Any], found: re.Match[str]) -> None:
    """Take the existing queue's value of the refused placement argument."""
    arg, value = found["arg"], found["value"] if found["value"] is not None else found["plain"]
    if value is None:
        wanted.pop(arg, None)
    elif arg == "x-quorum-initial-group-size":
        wanted[arg] = int(value)
    else:
        wanted[arg] = value


async def queue_depth(channel: AbstractChannel, name: str) -> int:
    """Messages ready in a queue (passive declare: never creates it)."""
    queue: AbstractQueue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Remove everything declare_topology made (tests and teardown only)."""
    for partition in range(topology.partitions):
        await channel.queue_delete(topology.queue(partition))
    await channel.queue_delete(topology.dead_letter_queue)
    await channel.queue_delete(topology.dead_letter_record_queue)
    await channel.exchange_delete(topology.exchange)
    await channel.exchange_delete(topology.dead_letter_exchange)


def amqp_message(body: bytes) -> aio_pika.Message:
    """The AMQP form of a purchase message's body: persistent, typed, JSON (for publishers that go
    through aio-pika: the replay of dead letters, the benchmark; the API's publisher writes the
    same properties as frames, in shared/amqp_publish.py)."""
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        type=MESSAGE_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
