"""The buffered frame receiver returns aiormq's frames and raises aiormq's errors, whatever the
sizes the stream arrives in; and connections read through it, deliveries of many frames whole."""

import asyncio
from collections.abc import Callable
from types import CoroutineType
from typing import cast

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.connection
import pamqp.frame
import pytest
from aiormq.abc import TaskWrapper
from aiormq.connection import ReceivedFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from shared import broker_nodes
from shared.amqp_receive import BufferedFrameReceiver, FrameQueue
from shared.settings import Settings

# aiormq's own, whatever install() has done to the name connections use.
AiormqFrameReceiver = BufferedFrameReceiver.__bases__[0]

Receiver = Callable[[asyncio.StreamReader], aiormq.connection.FrameReceiver]
RECEIVERS = pytest.mark.parametrize("receiver", [AiormqFrameReceiver, BufferedFrameReceiver])


def delivery(channel: int, tag: int, body: bytes, frame_max: int = 4096) -> list[bytes]:
    """The frames of a delivery: method, content header, then the body in frame_max pieces."""
    properties = commands.Basic.Properties(
        content_type="application/json",
        message_type="purchase.v2",
        delivery_mode=2,
        message_id=f"m-{tag}",
    )
    frames = [
        pamqp.frame.marshal(
            commands.Basic.Deliver("ctag", tag, tag % 2 == 0, "ex", "key.3"), channel
        ),
        pamqp.frame.marshal(ContentHeader(0, len(body), properties), channel),
    ]
    for start in range(0, len(body), frame_max):
        frames.append(pamqp.frame.marshal(ContentBody(body[start : start + frame_max]), channel))
    return frames


def stream() -> bytes:
    """Deliveries of bodies from empty to several frames long, heartbeats and a confirm between,
    on two channels."""
    frames = [pamqp.frame.marshal(Heartbeat(), 0)]
    for tag, size in enumerate([0, 1, 180, 4095, 4096, 4097, 20_000], start=1):
        body = bytes(n % 251 for n in range(size))
        frames += delivery(1 + tag % 2, tag, body)
        if tag == 3:
            frames.append(pamqp.frame.marshal(Heartbeat(), 0))
            frames.append(pamqp.frame.marshal(commands.Basic.Ack(7, multiple=True), 2))
    return b"".join(frames)


def as_bytes(received: ReceivedFrame) -> tuple[int, int, bytes]:
    """A received frame, comparable: its length on the wire, its channel, and pamqp's bytes."""
    weight, channel, frame = received
    return weight, channel, pamqp.frame.marshal(frame, channel)


async def read_all(receiver: aiormq.connection.FrameReceiver) -> list[tuple[int, int, bytes]]:
    frames = []
    while True:
        try:
            frames.append(as_bytes(await receiver.get_frame()))
        except StopAsyncIteration:
            return frames


async def feed(reader: asyncio.StreamReader, data: bytes, piece: int) -> None:
    """`data` in pieces of `piece` bytes, the receiver running between them."""
    for start in range(0, len(data), piece):
        reader.feed_data(data[start : start + piece])
        await asyncio.sleep(0)


def expected_frames() -> list[tuple[int, int, bytes]]:
    data, frames, start = stream(), [], 0
    while start < len(data):
        weight, channel, frame = pamqp.frame.unmarshal(data[start:])
        frames.append((weight, channel, pamqp.frame.marshal(frame, channel)))
        start += weight
    return frames


@RECEIVERS
@pytest.mark.parametrize("piece", [1, 3, 7, 8, 9, 100, 4104, 5000, 1 << 20])
async def test_frames_come_out_whole_and_in_order_whatever_pieces_the_stream_arrives_in(
    receiver: Receiver, piece: int
) -> None:
    expected = expected_frames()
    assert len(expected) == 1 + 2 + 3 + 3 + 2 + 3 + 3 + 4 + 7  # what stream() is made of
    reader = asyncio.StreamReader()
    feeding = asyncio.create_task(feed(reader, stream(), piece))
    receiving = receiver(reader)
    frames = [as_bytes(await asyncio.wait_for(receiving.get_frame(), 10)) for _ in expected]
    await feeding
    assert frames == expected


@RECEIVERS
async def test_a_frame_larger_than_a_read_that_trickles_in_comes_out_whole(
    receiver: Receiver,
) -> None:
    body = bytes(n % 251 for n in range(600_000))
    frames = delivery(1, 1, body, frame_max=300_000)
    reader = asyncio.StreamReader()
    feeding = asyncio.create_task(feed(reader, b"".join(frames), 1448))  # a TCP segment's worth
    receiving = receiver(reader)
    received = [as_bytes(await asyncio.wait_for(receiving.get_frame(), 10))[2] for _ in frames]
    await feeding
    assert received == frames


async def test_a_frame_that_trickles_in_is_gathered_in_one_wait_not_copied_piece_by_piece() -> None:
    """Once a frame's header is in, the rest is awaited at once: adding each piece to what is
    held would copy a large frame once per piece (quadratic in its size)."""
    frame = pamqp.frame.marshal(ContentBody(b"x" * 300_000), 1)
    reader = asyncio.StreamReader()
    receiving = BufferedFrameReceiver(reader)
    refills = 0
    refill = receiving._refill

    async def counted() -> None:
        nonlocal refills
        refills += 1
        await refill()

    receiving._refill = counted  # type: ignore[method-assign]
    feeding = asyncio.create_task(feed(reader, frame, 1448))
    assert as_bytes(await asyncio.wait_for(receiving.get_frame(), 10))[2] == frame
    await feeding
    assert refills == 2  # the header, with what came with it; then the rest


@pytest.mark.parametrize("cut", [3, 7, 30])
async def test_a_read_cancelled_mid_frame_loses_nothing(cut: int) -> None:
    """A get_frame cancelled while it waits (cut inside the header, or after it) takes nothing
    from the stream: the next one returns the frame whole. (aiormq's loses what it had read.)"""
    first, second = delivery(1, 1, b'{"n": 1}')[:2]
    reader = asyncio.StreamReader()
    receiving = BufferedFrameReceiver(reader)
    waiting = asyncio.create_task(receiving.get_frame())
    reader.feed_data(first[:cut])
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    reader.feed_data(first[cut:] + second)
    assert as_bytes(await receiving.get_frame())[2] == first
    assert as_bytes(await receiving.get_frame())[2] == second


@RECEIVERS
async def test_a_socket_error_inside_a_frame_is_a_connection_error(receiver: Receiver) -> None:
    first, second = delivery(1, 1, b"{}")[:2]
    reader = asyncio.StreamReader()
    reader.feed_data(first + second[:20])
    receiving = receiver(reader)
    assert as_bytes(await receiving.get_frame())[2] == first
    waiting = asyncio.create_task(receiving.get_frame())
    await asyncio.sleep(0.01)
    reader.set_exception(ConnectionResetError(104, "reset by peer"))
    with pytest.raises(AMQPConnectionError, match="connection reset"):
        await waiting


@RECEIVERS
async def test_a_stream_that_ended_between_frames_ends_the_frames(receiver: Receiver) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(stream())
    reader.feed_eof()
    assert await read_all(receiver(reader)) == expected_frames()


@RECEIVERS
async def test_a_stream_that_ends_while_a_frame_is_awaited_is_a_connection_error(
    receiver: Receiver,
) -> None:
    reader = asyncio.StreamReader()
    frames = delivery(1, 1, b"{}")
    reader.feed_data(b"".join(frames))
    receiving = receiver(reader)
    for _ in frames:
        await receiving.get_frame()
    waiting = asyncio.create_task(receiving.get_frame())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    reader.feed_eof()
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await waiting


@RECEIVERS
@pytest.mark.parametrize("cut", [1, 6, 7, 20])
async def test_a_stream_that_ends_inside_a_frame_is_a_connection_error(
    receiver: Receiver, cut: int
) -> None:
    reader = asyncio.StreamReader()
    first, second = delivery(1, 1, b"{}")[:2]
    reader.feed_data(first + second[:cut])
    reader.feed_eof()
    receiving = receiver(reader)
    assert as_bytes(await receiving.get_frame())[2] == first
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await receiving.get_frame()


@RECEIVERS
@pytest.mark.parametrize(
    ("error", "wording"),
    [
        (ConnectionResetError(104, "reset by peer"), "connection reset"),
        (ConnectionRefusedError(111, "refused"), "connection refused"),
        (BrokenPipeError(32, "broken pipe"), "connection error"),
        (OSError(113, "no route to host"), "communication error"),
    ],
)
async def test_a_socket_error_is_a_connection_error_in_aiormq_words(
    receiver: Receiver, error: OSError, wording: str
) -> None:
    reader = asyncio.StreamReader()
    waiting = asyncio.create_task(receiver(reader).get_frame())
    await asyncio.sleep(0.01)
    reader.set_exception(error)
    with pytest.raises(AMQPConnectionError, match=wording) as raised:
        await waiting
    assert raised.value.__cause__ is error


@RECEIVERS
async def test_a_broker_refusing_the_protocol_version_is_a_protocol_error(
    receiver: Receiver,
) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"AMQP\x00\x00\x09\x01")  # what a broker answers a version it does not speak
    reader.feed_eof()
    with pytest.raises(ProtocolSyntaxError):
        await receiver(reader).get_frame()


@RECEIVERS
async def test_a_frame_without_its_end_octet_is_an_invalid_frame(receiver: Receiver) -> None:
    reader = asyncio.StreamReader()
    ack = pamqp.frame.marshal(commands.Basic.Ack(7), 1)
    reader.feed_data(ack[:-1] + b"\x00")
    with pytest.raises(InvalidFrameError):
        await receiver(reader).get_frame()


def receiver_of(connection: aio_pika.abc.AbstractConnection) -> type:
    """The class of the receiver a connection's reader task reads from (its coroutine's own)."""
    transport = cast(aio_pika.Connection, connection).transport
    assert transport is not None
    amqp = cast(aiormq.Connection, transport.connection)
    task = cast(TaskWrapper, amqp._reader_task).task
    reader = cast("CoroutineType[object, object, None]", task.get_coro())
    assert reader.cr_frame is not None  # running: waiting for the next frame
    return type(reader.cr_frame.f_locals["frame_receiver"])


async def test_connections_read_through_the_buffered_receiver_and_deliver_messages_whole(
    settings: Settings,
) -> None:
    """A burst of small messages, and messages of several frames between them, arrive whole and
    in order, and the connection goes on answering after them."""
    connection = await broker_nodes.connect(settings)
    try:
        assert receiver_of(connection) is BufferedFrameReceiver
        channel = await connection.channel()
        amqp = cast(aiormq.Channel, await channel.get_underlay_channel())
        assert isinstance(amqp.frames, FrameQueue)
        assert amqp.frames.maxsize == aiormq.Connection.FRAME_BUFFER_SIZE  # aiormq's bound
        queue = await channel.declare_queue(f"{settings.broker_namespace}.receive", exclusive=True)
        bodies = [
            (b"x" * 400_000 if n % 500 == 7 else f'{{"n": {n}}}'.encode()) for n in range(2_000)
        ]
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
        received: list[bytes] = []
        async with queue.iterator() as messages:
            async for message in messages:
                received.append(message.body)
                await message.ack()
                if len(received) == len(bodies):
                    break
        assert received == bodies
        declared = await channel.declare_queue(queue.name, passive=True)
        assert declared.declaration_result.message_count == 0
    finally:
        await connection.close()


QUEUES = pytest.mark.parametrize("queue_type", [asyncio.Queue, FrameQueue])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@QUEUES
async def test_a_frame_queue_hands_frames_over_in_order_within_its_bound(
    queue_type: type[FrameQueue],
) -> None:
    queue = queue_type(3)

    async def produce() -> None:
        for n in range(100):
            await queue.put(n)

    producing = asyncio.create_task(produce())
    await settle()
    assert queue.qsize() == 3
    assert not producing.done()  # full: the producer waits for room
    received = [await queue.get() for _ in range(100)]
    queue.task_done()
    await producing
    assert received == list(range(100))
    assert queue.qsize() == 0


@QUEUES
async def test_a_getter_woken_then_cancelled_passes_its_frame_to_the_next(
    queue_type: type[FrameQueue],
) -> None:
    queue = queue_type(10)
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await settle()
    await queue.put("frame")  # wakes the first getter, which has not run yet
    first.cancel()
    assert await asyncio.wait_for(second, 1) == "frame"
    assert first.cancelled()


@QUEUES
async def test_a_getter_cancelled_while_waiting_takes_nothing(
    queue_type: type[FrameQueue],
) -> None:
    queue = queue_type(10)
    waiting = asyncio.create_task(queue.get())
    await settle()
    waiting.cancel()
    await settle()
    assert not queue._getters  # its waiter is gone, not left to be skipped later
    await queue.put("frame")
    assert await asyncio.wait_for(queue.get(), 1) == "frame"


@QUEUES
async def test_a_putter_cancelled_while_waiting_for_room_puts_nothing(
    queue_type: type[FrameQueue],
) -> None:
    queue = queue_type(1)
    await queue.put("first")
    waiting = asyncio.create_task(queue.put("second"))
    await settle()
    waiting.cancel()
    await settle()
    assert waiting.cancelled()
    assert not queue._putters  # its waiter is gone, not left to be skipped later
    assert await queue.get() == "first"
    assert queue.qsize() == 0


@QUEUES
async def test_a_putter_woken_then_cancelled_passes_the_room_to_the_next(
    queue_type: type[FrameQueue],
) -> None:
    queue = queue_type(1)
    await queue.put("first")
    cancelled = asyncio.create_task(queue.put("cancelled"))
    second = asyncio.create_task(queue.put("second"))
    await settle()
    assert await queue.get() == "first"  # room: wakes the first putter, which has not run yet
    cancelled.cancel()
    await asyncio.wait_for(second, 1)
    assert await queue.get() == "second"
    assert queue.qsize() == 0
