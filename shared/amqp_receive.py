"""Reading the broker's frames out of a buffer, many frames to a read.

aiormq's FrameReceiver reads each frame with three `readexactly` calls, under a lock, through a
BytesIO: about a quarter of a worker's CPU when a message carries one purchase (a delivery is
three frames). This receiver reads whatever the socket has and cuts the frames out of it, so a
read that brought a few hundred deliveries costs one await, and a frame already in the buffer
none. It raises what aiormq's raises, in the same cases (tests/shared/test_amqp_receive.py runs
both over the same streams), and decodes every frame as `pamqp.frame.unmarshal` does, the frames
of a delivery by shared/amqp_frames.py.

The connection's reader task hands each frame to its channel's task through a queue of the
channel's (ten frames at most). aiormq's is an asyncio.Queue, whose bookkeeping (its size checks,
waiters and unfinished-task count, about a dozen calls a frame) cost as much as cutting the frames
out: each channel gets a FrameQueue instead, the same bound without the bookkeeping.

aiormq builds its receiver and its channels by the module-level names
`aiormq.connection.FrameReceiver` and `aiormq.connection.Channel` when a connection opens and
when it opens a channel: `install()` points those names here, for every connection opened after
it.
"""

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import aiormq.channel
import aiormq.connection
from aiormq.connection import ReceivedFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.exceptions import PAMQPException

from shared import amqp_frames

_HEAD = amqp_frames.HEAD
_HEAD_SIZE = _HEAD.size
_READ_SIZE = 256 * 1024  # a read takes at most this (and at least what the frame needs)


class BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._data = b""  # read and not yet returned: from _start on
        self._start = 0

    async def get_frame(self) -> ReceivedFrame:
        frame = self._cut()
        if frame is not None:
            return frame
        # One refill at a time: a StreamReader takes one reader. (Of two callers, the one that
        # refilled may take the next frame before the one queued on the lock; aiormq has one
        # caller, the connection's reader task, after the handshake.)
        async with self.lock:
            while (frame := self._cut()) is None:
                await self._refill()
            return frame

    def _cut(self) -> ReceivedFrame | None:
        """The next whole frame in the buffer, unmarshalled; None if it is not all there."""
        data, start = self._data, self._start
        if len(data) - start < _HEAD_SIZE:
            return None
        if not self.started:
            if data.startswith(b"AMQP", start):  # the broker refused our protocol version
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        _, _, size = _HEAD.unpack_from(data, start)
        end = start + _HEAD_SIZE + size + 1  # the payload, then the frame-end octet
        if len(data) < end:
            return None
        self._start = end
        try:
            return amqp_frames.unmarshal(data, start, end)
        except PAMQPException as e:
            raise InvalidFrameError(str(e)) from e

    async def _refill(self) -> None:
        held = self._data[self._start :]
        if not held and self.reader.at_eof():
            raise StopAsyncIteration  # closed between frames: the reader ends, as aiormq's
        missing = self._missing(held)
        try:
            if len(held) >= _HEAD_SIZE:
                # A frame begun: the rest of it at once. The StreamReader gathers it in its own
                # buffer, where adding each read piece to `held` would copy a large frame that
                # trickles in once per piece.
                chunk = await self.reader.readexactly(missing)
            else:
                chunk = await self.reader.read(max(_READ_SIZE, missing))
        except asyncio.IncompleteReadError as e:
            raise _closed(len(held) + len(e.partial), len(held) + missing) from e
        except OSError as e:
            raise _connection_error(e) from e
        if not chunk:  # closed while this waited: aiormq's readexactly raises the same
            raise _closed(len(held), len(held) + missing)
        # Written only here, after the await: a read cancelled takes nothing from the reader,
        # and leaves the buffer as it was.
        self._data, self._start = held + chunk, 0

    @staticmethod
    def _missing(held: bytes) -> int:
        """Bytes still to come before `held` is a whole frame (its header at least)."""
        if len(held) < _HEAD_SIZE:
            return _HEAD_SIZE - len(held)
        size: int = _HEAD.unpack_from(held)[2]
        return max(0, _HEAD_SIZE + size + 1 - len(held))


def _closed(read: int, expected: int) -> AMQPConnectionError:
    return AMQPConnectionError(
        f"Server connection unexpectedly closed. Read {read} bytes but {expected} bytes expected"
    )


def _connection_error(error: OSError) -> AMQPConnectionError:
    """aiormq's wording for each way a socket read fails."""
    if isinstance(error, ConnectionRefusedError):
        return AMQPConnectionError(f"Server connection refused: {error!r}")
    if isinstance(error, ConnectionResetError):
        return AMQPConnectionError(f"Server connection reset: {error!r}")
    if isinstance(error, ConnectionError):
        return AMQPConnectionError(f"Server connection error: {error!r}")
    return AMQPConnectionError(f"Server communication error: {error!r}")


class FrameQueue:
    """A channel's frames, put by the connection's reader task and got by the channel's: an
    asyncio.Queue's `put`, `get` and `task_done`, the only calls aiormq makes on it, with the
    same bound and the same waiting (a task waits for room, or for a frame, in turn with others
    waiting for the same)."""

    __slots__ = ("_frames", "_getters", "_putters", "maxsize")

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize  # 0: unbounded
        self._frames: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def qsize(self) -> int:
        return len(self._frames)

    async def put(self, item: Any) -> None:
        while 0 < self.maxsize <= len(self._frames):
            await self._wait(self._putters, ready=self._has_room)
        self._frames.append(item)
        if self._getters:
            _wake_next(self._getters)

    async def get(self) -> Any:
        while not self._frames:
            await self._wait(self._getters, ready=self._has_frames)
        item = self._frames.popleft()
        if self._putters:
            _wake_next(self._putters)
        return item

    def task_done(self) -> None:
        """Nothing to count: nobody joins a channel's frames."""

    def _has_room(self) -> bool:
        return not 0 < self.maxsize <= len(self._frames)

    def _has_frames(self) -> bool:
        return bool(self._frames)

    @staticmethod
    async def _wait(waiters: deque[asyncio.Future[None]], *, ready: Callable[[], bool]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            waiter.cancel()
            if waiter in waiters:
                waiters.remove(waiter)
            elif not waiter.cancelled() and ready():
                # Woken for a frame (or room) it will not take now: the next in line takes it.
                _wake_next(waiters)
            raise


def _wake_next(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


class QueuedFramesChannel(aiormq.channel.Channel):
    """aiormq's channel, its frames held in a FrameQueue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The channel's reader task, made in the constructor, first reads `frames` when the
        # loop runs it, after this (an eager task factory, opt-in since Python 3.12, would run
        # it at once, on the queue replaced here).
        self.frames = FrameQueue(self.frames.maxsize)  # type: ignore[assignment]


def install() -> None:
    """Connections opened from now on read their frames with BufferedFrameReceiver, and hand
    them to their channels through FrameQueues."""
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]
    aiormq.connection.Channel = QueuedFramesChannel  # type: ignore[attr-defined]
