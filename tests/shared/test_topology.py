"""Queues declared by an earlier version, or with other settings: placement arguments
(QUORUM_REPLICAS, the leader locator) are kept as the queue has them, with a warning; any other
difference is one clear start-up error, never a crash."""

import logging

import aio_pika
import pytest

from shared import broker, broker_nodes
from shared.settings import Settings


def _old_arguments(topology: broker.Topology) -> dict[str, object]:
    """The partition queues' arguments before QUORUM_REPLICAS and the leader locator."""
    arguments = topology.partition_queue_arguments()
    for name in broker.PLACEMENT_ARGUMENTS:
        del arguments[name]
    return arguments


async def _declare_raw(settings: Settings, name: str, arguments: dict[str, object]) -> None:
    connection = await broker_nodes.connect(settings)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments=arguments)  # type: ignore[arg-type]
    finally:
        await connection.close()


async def _mismatch(settings: Settings, topology: broker.Topology) -> str:
    """What declaring `topology` over the queues already there is refused with."""
    connection = await broker_nodes.connect(settings)
    try:
        with pytest.raises(broker.TopologyMismatch) as raised:
            await broker.declare_topology(connection, topology)
    finally:
        await connection.close()
    return str(raised.value)


async def test_new_queues_get_the_replica_count_and_the_balanced_leader_locator(
    settings: Settings,
) -> None:
    topology = broker.Topology.from_settings(settings)
    assert topology.quorum_replicas == 3
    for arguments in (topology.partition_queue_arguments(), topology.dead_letter_queue_arguments()):
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-quorum-initial-group-size"] == 3
        assert arguments["x-queue-leader-locator"] == "balanced"
    connection = await broker_nodes.connect(settings)
    try:
        await broker.declare_topology(connection, topology)
        await broker.declare_topology(connection, topology)  # idempotent
    finally:
        await connection.close()


async def test_queues_declared_before_the_placement_arguments_keep_working(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topology = broker.Topology.from_settings(settings)
    await _declare_raw(settings, topology.queue(0), _old_arguments(topology))
    await _declare_raw(settings, topology.dead_letter_queue, {"x-queue-type": "quorum"})
    # And one created with another replica count than this process's QUORUM_REPLICAS.
    await _declare_raw(
        settings,
        topology.queue(1),
        {**topology.partition_queue_arguments(), "x-quorum-initial-group-size": 5},
    )

    connection = await broker_nodes.connect(settings)
    try:
        with caplog.at_level(logging.WARNING, logger="shared.broker"):
            await broker.declare_topology(connection, topology)
        # The queues are usable as declared: a message routed to partition 0 lands there.
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.exchange)
        await exchange.publish(aio_pika.Message(b"{}"), routing_key="0", mandatory=True)
        queue = await channel.declare_queue(topology.queue(0), passive=True)
        assert queue.declaration_result.message_count == 1
    finally:
        await connection.close()
    kept = [r.getMessage() for r in caplog.records if "keeps the placement" in r.getMessage()]
    assert any(topology.queue(0) in line and "none" in line for line in kept), kept
    assert any(topology.queue(1) in line and "=5" in line for line in kept), kept
    assert any(topology.dead_letter_queue in line for line in kept), kept


async def test_a_queue_with_another_length_limit_is_one_clear_error(settings: Settings) -> None:
    topology = broker.Topology.from_settings(settings)
    await _declare_raw(settings, topology.queue(0), {**_old_arguments(topology), "x-max-length": 7})

    message = await _mismatch(settings, topology)

    # In the operator's numbers: x-max-length is one less than the setting.
    assert (
        f"queue {topology.queue(0)!r} exists with QUEUE_MAX_LENGTH=8 (x-max-length), and these "
        f"settings ask for QUEUE_MAX_LENGTH={settings.queue_max_length}"
    ) in message
    assert "Moving queues to new arguments" in message


async def test_a_dead_letter_queue_with_a_length_limit_is_one_clear_error(
    settings: Settings,
) -> None:
    """No setting gives a dead-letter queue a limit: one declared with one (by hand) is told in
    RabbitMQ's words, as a TopologyMismatch, never a KeyError from naming a setting."""
    topology = broker.Topology.from_settings(settings)
    arguments = {**topology.dead_letter_queue_arguments(), "x-max-length": 7}
    for name in broker.PLACEMENT_ARGUMENTS:
        arguments.pop(name, None)
    await _declare_raw(settings, topology.dead_letter_queue, arguments)

    message = await _mismatch(settings, topology)

    assert "x-max-length" in message
    assert "QUEUE_MAX_LENGTH=" not in message


async def test_a_redeclaration_after_a_reconnect_makes_and_binds_what_went_missing(
    settings: Settings,
) -> None:
    """rebind=False (a reconnect) binds no queue that exists, but one deleted meanwhile is made
    again and bound: no partition is left unroutable."""
    topology = broker.Topology.from_settings(settings)
    connection = await broker_nodes.connect(settings)
    try:
        await broker.declare_topology(connection, topology)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.queue_delete(topology.queue(0))
        await broker.declare_topology(connection, topology, rebind=False)
        exchange = await channel.get_exchange(topology.exchange)
        for partition in range(topology.partitions):
            # Returned, and raised, were a partition's queue not bound.
            await exchange.publish(
                broker.amqp_message(b"{}"), topology.routing_key(partition), mandatory=True
            )
        for partition in range(topology.partitions):
            assert await broker.queue_depth(channel, topology.queue(partition)) == 1
    finally:
        await connection.close()
