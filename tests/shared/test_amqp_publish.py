"""The hand-written publish frames are pamqp's bytes, and a broker confirms, returns and nacks
what is published through them as it would through aiormq's basic_publish (the channel's own
bookkeeping resolves each publish)."""

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import cast

import aiormq
import pamqp.frame
import pytest
import pytest_asyncio
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq.abc import ChannelFrame
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.common import FieldValue
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from shared import broker_nodes
from shared.amqp_publish import ConfirmedPublisher, MessageFrames
from shared.settings import Settings

MAX_CONTENT = 100


def pamqp_frames(number: int, body: bytes, message_id: str) -> bytes:
    """What aiormq's basic_publish writes for the same message."""
    method = commands.Basic.Publish(exchange="ex", routing_key="key.7", mandatory=True)
    properties = commands.Basic.Properties(
        content_type="application/json",
        message_type="purchase.v2",
        delivery_mode=2,
        message_id=message_id,
    )
    frames = [
        pamqp.frame.marshal(method, number),
        pamqp.frame.marshal(ContentHeader(0, len(body), properties), number),
    ]
    for start in range(0, len(body), MAX_CONTENT):
        frames.append(pamqp.frame.marshal(ContentBody(body[start : start + MAX_CONTENT]), number))
    return b"".join(frames)


@pytest.mark.parametrize("size", [1, 57, MAX_CONTENT - 1, MAX_CONTENT, MAX_CONTENT + 1, 1_000])
def test_the_frames_are_the_bytes_pamqp_writes(size: int) -> None:
    channel = cast(aiormq.Channel, SimpleNamespace(number=3, max_content_size=MAX_CONTENT))
    frames = MessageFrames(
        channel,
        exchange="ex",
        routing_key="key.7",
        content_type="application/json",
        message_type="purchase.v2",
    )
    body = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert frames.of(body, "id-é-1") == pamqp_frames(3, body, "id-é-1")


@pytest_asyncio.fixture
async def channel(settings: Settings) -> AsyncIterator[aiormq.Channel]:
    connection = await broker_nodes.connect(settings)
    try:
        opened = await connection.channel(publisher_confirms=True, on_return_raises=True)
        yield cast(aiormq.Channel, await opened.get_underlay_channel())
    finally:
        await connection.close()


async def exclusive_queue(
    channel: aiormq.Channel, name: str, arguments: dict[str, FieldValue] | None = None
) -> str:
    declared = await channel.queue_declare(name, exclusive=True, arguments=arguments)
    assert declared.queue is not None
    return declared.queue


def publisher_on(
    channel: aiormq.Channel, socket: asyncio.StreamWriter | None = None
) -> ConfirmedPublisher:
    """Publishes to queues by name (the default exchange); straight to `socket` if given."""
    return ConfirmedPublisher(
        channel,
        exchange="",
        content_type="application/json",
        message_type="purchase.v2",
        socket=socket,
    )


async def test_published_messages_are_confirmed_and_arrive_whole_and_in_order(
    settings: Settings, channel: aiormq.Channel
) -> None:
    queue = await exclusive_queue(channel, f"{settings.broker_namespace}.frames")
    publisher = publisher_on(channel)
    # More at once than the connection's write queue holds: some wait for room, in order.
    bodies = [f'{{"n": {n}, "pad": "{"x" * 300_000 * (n % 2)}"}}'.encode() for n in range(40)]
    confirmations = [publisher.publish(queue, body, f"m-{n}") for n, body in enumerate(bodies)]
    answers = await asyncio.gather(*confirmations)
    assert all(isinstance(answer, commands.Basic.Ack) for answer in answers)
    received = []
    for _ in bodies:
        message = await channel.basic_get(queue, no_ack=True)
        received.append(message)
    assert [message.body for message in received] == bodies
    properties = received[0].header.properties
    assert (properties.content_type, properties.message_type, properties.delivery_mode) == (
        "application/json",
        "purchase.v2",
        2,
    )
    assert [message.header.properties.message_id for message in received] == [
        f"m-{n}" for n in range(40)
    ]
    assert not channel.confirmations
    assert not channel.message_id_delivery_tag


async def test_a_message_no_queue_takes_is_returned(
    settings: Settings, channel: aiormq.Channel
) -> None:
    publisher = publisher_on(channel)
    confirmation = publisher.publish(f"{settings.broker_namespace}.nowhere", b"{}", "lost")
    with pytest.raises(PublishError):
        await confirmation
    # The channel goes on: the next publish is confirmed.
    queue = await exclusive_queue(channel, f"{settings.broker_namespace}.after")
    ack = await publisher.publish(queue, b"{}", "next")
    assert isinstance(ack, commands.Basic.Ack)


async def test_a_message_a_full_queue_refuses_is_nacked(
    settings: Settings, channel: aiormq.Channel
) -> None:
    queue = await exclusive_queue(
        channel,
        f"{settings.broker_namespace}.full",
        {"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    publisher = publisher_on(channel)
    assert isinstance(await publisher.publish(queue, b"1", "a"), commands.Basic.Ack)
    with pytest.raises(DeliveryError):
        await publisher.publish(queue, b"2", "b")


async def test_nothing_is_published_on_a_closed_channel(channel: aiormq.Channel) -> None:
    publisher = publisher_on(channel)
    await channel.close()
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        publisher.publish("anywhere", b"", "y")
    assert channel.delivery_tag == 0
    assert not channel.confirmations


async def test_with_the_socket_known_messages_keep_their_order_behind_frames_already_queued(
    settings: Settings,
) -> None:
    """Written straight to the socket while nothing is queued; behind what is queued once
    something is (aiormq's own frames), and in a backlog of their own while the queue is full:
    the queue receives them in publish order all the same, each confirmed."""
    connection = await broker_nodes.connect(settings)
    try:
        opened = await connection.channel(publisher_confirms=True, on_return_raises=True)
        channel = cast(aiormq.Channel, await opened.get_underlay_channel())
        queue = await exclusive_queue(channel, f"{settings.broker_namespace}.direct")
        socket = broker_nodes.socket_of(connection)
        assert socket is not None
        publisher = publisher_on(channel, socket)
        heartbeat = ChannelFrame(payload=pamqp.frame.marshal(Heartbeat(), 0), should_close=False)
        confirmations = [publisher.publish(queue, b'{"n": 0}', "m-0")]  # straight to the socket
        assert channel.write_queue.empty()
        channel.write_queue.put_nowait(heartbeat)
        confirmations.append(publisher.publish(queue, b'{"n": 1}', "m-1"))  # behind it
        while not channel.write_queue.full():
            channel.write_queue.put_nowait(heartbeat)
        confirmations += [  # in the backlog, behind the full queue
            publisher.publish(queue, f'{{"n": {n}}}'.encode(), f"m-{n}") for n in range(2, 6)
        ]
        answers = await asyncio.gather(*confirmations)
        assert all(isinstance(answer, commands.Basic.Ack) for answer in answers)
        received = [await channel.basic_get(queue, no_ack=True) for _ in range(6)]
        assert [m.body for m in received] == [f'{{"n": {n}}}'.encode() for n in range(6)]
    finally:
        await connection.close()


class BrokenSocket:
    """A socket writer that refuses every write while it looks open."""

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        raise RuntimeError("the transport's handler is closed")


async def test_a_message_the_socket_refused_gives_its_delivery_tag_back(
    settings: Settings, channel: aiormq.Channel
) -> None:
    """Never sent, it must not keep its tag: the broker's next confirm is for the next message,
    and would otherwise resolve this one's publish instead."""
    queue = await exclusive_queue(channel, f"{settings.broker_namespace}.refused")
    publisher = publisher_on(channel, cast(asyncio.StreamWriter, BrokenSocket()))
    with pytest.raises(RuntimeError):
        publisher.publish(queue, b'{"n": 0}', "m-0")
    assert channel.delivery_tag == 0
    assert not channel.confirmations
    assert not channel.message_id_delivery_tag
    publisher._socket = None  # through aiormq's writer from now on
    assert isinstance(await publisher.publish(queue, b'{"n": 1}', "m-1"), commands.Basic.Ack)
    message = await channel.basic_get(queue, no_ack=True)
    assert message.body == b'{"n": 1}'
