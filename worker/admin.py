"""Operator commands: `python -m worker status`, `dead-letters` and `replay-dead-letters`."""

import asyncio
import base64
import sys
from collections import Counter, defaultdict
from typing import TextIO

import aio_pika
from aio_pika.exceptions import ChannelNotFoundEntity
from pydantic import ValidationError

from shared import broker, broker_nodes, preflight
from shared.db import create_pool
from shared.errors import StartupError
from shared.messages import Command, PurchaseMessage, PurchaseRequested, encode_message
from shared.purchases import repository as purchases
from shared.settings import Settings
from worker import leases, membership
from worker.queue_leaders import public_address, queue_leaders


async def status(settings: Settings, out: TextIO = sys.stdout) -> None:
    """Print each partition's owner, epoch, lease state and queue depth, and the dead letters."""
    # A PARTITIONS other than the deployment's would show partitions that do not exist, or hide
    # some (and their queued purchases); a status only reads, so it records none.
    await preflight.check_database(settings, wait_s=0, record_partitions=False)
    await preflight.check_broker(settings, wait_s=0)
    topology = broker.Topology.from_settings(settings)
    pool = await create_pool(settings, wait_s=0)
    try:
        async with pool.acquire() as conn:
            rows = {row["partition"]: row for row in await leases.all_leases(conn)}
            workers = await membership.live_workers(conn)
            kept = await purchases.kept_holds(conn)
    finally:
        await pool.close()
    connection = await broker_nodes.connect(settings, "admin")
    try:
        depths = [await _depth(connection, topology.queue(p)) for p in range(topology.partitions)]
        dead = await _depth(connection, topology.dead_letter_queue)
    finally:
        await connection.close()
    leaders = await queue_leaders(settings)

    out.write(f"live workers ({len(workers)}): {', '.join(workers) or '-'}\n")
    out.write(f"{'partition':>9}  {'owner':<30} {'epoch':>6}  {'lease':<7} {'queued':>8}  leader\n")
    for partition in range(topology.partitions):
        row = rows.get(partition)
        owner = str(row["owner"]) if row and row["owner"] else "-"
        epoch = str(row["epoch"]) if row else "0"
        state = "live" if row and row["live"] else ("expired" if row and row["owner"] else "free")
        depth = depths[partition]
        queued = "-" if depth is None else str(depth)
        leader = (leaders or {}).get(topology.queue(partition), "-")
        out.write(f"{partition:>9}  {owner:<30} {epoch:>6}  {state:<7} {queued:>8}  {leader}\n")
    out.write(f"queued in all partitions: {_total(depths, settings.broker_namespace)}\n")
    out.write(
        "(messages ready to deliver: one a worker holds unacknowledged shows once it stops)\n"
    )
    out.write(_leader_spread(settings, topology, leaders))
    out.write(f"dead letters ({topology.dead_letter_queue}): {'-' if dead is None else dead}\n")
    if kept["holds"]:
        out.write(
            f"holds kept for a confirmation not applied yet: {kept['holds']} (the oldest since "
            f"{kept['since'].isoformat()}); replay-dead-letters applies the dead-lettered ones\n"
        )
    if None in depths or dead is None:
        out.write("('-': queue not declared yet; a worker or the API declares them on start)\n")


def _total(depths: list[int | None], namespace: str) -> str:
    """What the partition queues hold in all, never a 0 that reads as drained where some are not
    declared (a BROKER_NAMESPACE or PARTITIONS other than the deployment's, say)."""
    declared = [depth for depth in depths if depth is not None]
    if not declared:
        return f"- (no partition queue is declared under BROKER_NAMESPACE {namespace!r})"
    if len(declared) < len(depths):
        return f"{sum(declared)} in the {len(declared)} of {len(depths)} declared"
    return str(sum(declared))


def _leader_spread(
    settings: Settings, topology: broker.Topology, leaders: dict[str, str] | None
) -> str:
    if leaders is None:
        return (
            "partition leaders: unknown (no RabbitMQ management API answered at "
            f"{', '.join(map(public_address, settings.rabbitmq_management_urls))}: enable the "
            "rabbitmq_management plugin, or set RABBITMQ_MANAGEMENT_URL)\n"
        )
    queues = map(topology.queue, range(topology.partitions))
    spread = Counter(leaders[queue] for queue in queues if queue in leaders)
    nodes = ", ".join(f"{node} {count}" for node, count in sorted(spread.items()))
    return f"partition leaders per node: {nodes or '-'}\n"


async def _depth(connection: aio_pika.abc.AbstractConnection, name: str) -> int | None:
    """A queue's ready messages, or None when it does not exist. A channel of its own: the
    broker closes a channel whose passive declare fails."""
    channel = await connection.channel()
    try:
        return await broker.queue_depth(channel, name)
    except ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def replay_dead_letters(settings: Settings, out: TextIO = sys.stdout) -> tuple[int, int]:
    """Move dead letters back to their partitions (after the fault that killed them is fixed).

    Each replayed purchase is republished (persistent, confirmed) before its dead letter is acked,
    so a crash in between replays it twice at worst, and the worker applies an id once. Purchases
    recorded `failed` are decided anew; ones already confirmed or rejected are skipped by the
    worker. Undecodable dead letters cannot be replayed and stay where they are.
    Returns (purchases replayed, messages left in the dead-letter queue).
    """
    # Replay routes purchases to partitions: it must count them as the deployment does.
    await preflight.check_database(settings, wait_s=0)
    await preflight.check_broker(settings, wait_s=0)
    topology = broker.Topology.from_settings(settings)
    connection = await broker_nodes.connect(settings, "admin")
    replayed = kept = 0
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange, queue = await _declared(channel, topology)
        unreadable: list[aio_pika.abc.AbstractIncomingMessage] = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            try:
                decoded = PurchaseMessage.from_body(message.body)
            except ValidationError:
                unreadable.append(message)  # held unacked so the loop does not get it again
                continue
            # Re-route by the current partition count, in the original order.
            by_partition: dict[int, list[Command]] = defaultdict(list)
            for command in decoded.commands:
                by_partition[topology.partition_of(command.event_id)].append(command)
            for partition, commands in by_partition.items():
                await exchange.publish(
                    broker.amqp_message(encode_message(partition, commands)),
                    routing_key=topology.routing_key(partition),
                    mandatory=True,
                )
                replayed += sum(1 for c in commands if isinstance(c, PurchaseRequested))
            await message.ack()
        for message in unreadable:
            await message.nack(requeue=True)
        kept = len(unreadable)
    finally:
        await connection.close()
    out.write(f"replayed {replayed} purchase(s); {kept} undecodable dead letter(s) left in place\n")
    return replayed, kept


async def dead_letters(
    settings: Settings, out: TextIO = sys.stdout, *, drop_undecodable: bool = False
) -> tuple[int, int]:
    """Print each dead letter: why it died, and its purchases, or its bytes if it cannot be
    decoded. Every one is put back, but with `drop_undecodable` those that cannot be decoded
    (nothing can replay them; their purchases, where an id could be read, are recorded failed)
    are removed, each printed whole first (base64) so that nothing goes unrecorded.
    Returns (dead letters listed, undecodable ones dropped)."""
    await preflight.check_broker(settings, wait_s=0)
    topology = broker.Topology.from_settings(settings)
    connection = await broker_nodes.connect(settings, "admin")
    listed = dropped = 0
    try:
        channel = await connection.channel()
        _, queue = await _declared(channel, topology)
        held: list[aio_pika.abc.AbstractIncomingMessage] = []  # unacked: not got again
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            listed += 1
            why = _death_of(message)
            try:
                decoded = PurchaseMessage.from_body(message.body)
            except ValidationError:
                if drop_undecodable:
                    raw = base64.b64encode(message.body).decode()
                    out.write(f"{listed}: undecodable, {why}: dropped; base64: {raw}\n")
                    await message.ack()
                    dropped += 1
                    continue
                out.write(
                    f"{listed}: undecodable, {why}: {len(message.body)} bytes {message.body[:60]!r}\n"
                )
            else:
                kinds = Counter(type(command).__name__ for command in decoded.commands)
                ids = ", ".join(str(command.purchase_id) for command in decoded.commands)
                out.write(
                    f"{listed}: partition {decoded.partition}, {why}: "
                    f"{', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))}: {ids}\n"
                )
            held.append(message)
        for message in held:
            await message.nack(requeue=True)
    finally:
        await connection.close()
    out.write(
        f"{listed} dead letter(s) in {topology.dead_letter_queue}"
        + (f"; {dropped} undecodable one(s) dropped\n" if drop_undecodable else "\n")
    )
    return listed, dropped


async def _declared(
    channel: aio_pika.abc.AbstractChannel, topology: broker.Topology
) -> tuple[aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue]:
    """The purchases exchange and the dead-letter queue, as declared (passive: never
    (re)declares them)."""
    try:
        exchange = await channel.get_exchange(topology.exchange)
        queue = await channel.get_queue(topology.dead_letter_queue)
    except ChannelNotFoundEntity:
        raise StartupError(
            f"the {topology.namespace}.purchases queues are not declared on this broker: "
            "start the API or a worker once (they declare them), or check BROKER_NAMESPACE."
        ) from None
    return exchange, queue


def _death_of(message: aio_pika.abc.AbstractIncomingMessage) -> str:
    """Why and from where RabbitMQ dead-lettered it (its first death)."""
    headers = message.headers or {}
    reason = _text(headers.get("x-first-death-reason")) or "unknown reason"
    queue = _text(headers.get("x-first-death-queue"))
    return f"{reason} from {queue}" if queue else reason


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def run_status(settings: Settings) -> None:
    asyncio.run(status(settings))


def run_replay(settings: Settings) -> None:
    asyncio.run(replay_dead_letters(settings))


def run_dead_letters(settings: Settings, *, drop_undecodable: bool) -> None:
    asyncio.run(dead_letters(settings, drop_undecodable=drop_undecodable))
