"""RabbitMQ topology, declared in this one place, and the connection both services open.

    purchases (direct) --"<p>"--> <ns>.purchases.<p>   quorum, single active consumer, one per partition
          | dead letters (rejected by a worker, or past the delivery limit)
          v
    purchases.dlx (fanout) --> <ns>.purchases.dead-letter         kept for inspection and replay
                           --> <ns>.purchases.dead-letter.record  read by workers to mark purchases failed

The routing key is the event's partition, from a stable hash of the event id, so every purchase of
one event lands in one queue in the order the API accepted it.
"""

import zlib
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelPreconditionFailed

from shared.errors import StartupError
from shared.retry import BROKER_UNAVAILABLE, wait_for_service
from shared.settings import Settings

# The broker closes a connection after two missed heartbeats: short, so that a frozen worker's
# single-active-consumer slot passes to the lease's new owner within seconds, not minutes.
HEARTBEAT_S = 5
# After a broker outage the API is back within about this long (503s meanwhile).
RECONNECT_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Topology:
    namespace: str
    partitions: int
    max_length: int
    delivery_limit: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "Topology":
        return cls(
            namespace=settings.broker_namespace,
            partitions=settings.partitions,
            max_length=settings.queue_max_length,
            delivery_limit=settings.delivery_limit,
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

    def partition_queue_arguments(self) -> dict[str, Any]:
        return {
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


async def connect(settings: Settings, *, wait_s: float = 30.0) -> AbstractRobustConnection:
    """A connection that reopens itself and its channels (the API's publisher)."""
    async for attempt in wait_for_service("rabbitmq", BROKER_UNAVAILABLE, wait_s):
        with attempt:
            connection = await aio_pika.connect_robust(
                settings.rabbitmq_url,
                heartbeat=HEARTBEAT_S,
                client_properties=_name("api"),
                reconnect_interval=RECONNECT_INTERVAL_S,
            )
    return connection


async def connect_plain(settings: Settings) -> AbstractConnection:
    """A connection that stays closed once lost (the worker's): a robust one would silently
    re-subscribe consumers to partitions the worker may no longer lease."""
    return await aio_pika.connect(
        settings.rabbitmq_url,
        heartbeat=HEARTBEAT_S,
        client_properties=_name(f"worker {settings.worker_id}"),
    )


def _name(role: str) -> dict[str, Any]:
    return {"connection_name": f"ticketing {role}"}


class TopologyMismatch(StartupError):
    """A queue or exchange exists with other arguments than these settings ask for."""


async def declare_topology(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    """Declare every exchange, queue and binding (idempotent); return the purchases exchange."""
    try:
        return await _declare(channel, topology)
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"{exc}. RabbitMQ cannot change a queue's arguments in place: keep the earlier "
            "setting (PARTITIONS, QUEUE_MAX_LENGTH, DELIVERY_LIMIT), or drain and delete the "
            f"{topology.namespace}.purchases.* queues, or use another BROKER_NAMESPACE."
        ) from exc


async def _declare(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    exchange = await channel.declare_exchange(
        topology.exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dlx = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    for name in (topology.dead_letter_queue, topology.dead_letter_record_queue):
        dead = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        await dead.bind(dlx)
    arguments = topology.partition_queue_arguments()
    for partition in range(topology.partitions):
        queue = await channel.declare_queue(
            topology.queue(partition), durable=True, arguments=arguments
        )
        await queue.bind(exchange, routing_key=topology.routing_key(partition))
    return exchange


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
