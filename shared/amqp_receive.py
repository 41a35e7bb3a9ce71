"""Reading the broker's frames out of a buffer, many frames to a read.

aiormq's FrameReceiver reads each frame with three `readexactly` calls, under a lock, through a
BytesIO: about a quarter of a worker's CPU when a message carries one purchase (a delivery is
three frames). This receiver reads whatever the socket has and cuts the frames out of it, so a
read that brought a few hundred deliveries costs one await, and a frame already in the buffer
none. It raises what aiormq's raises, in the same cases (tests/shared/test_amqp_receive.py runs
both over the same streams), and decodes every frame as `pamqp.frame.unmarshal` does, the frames
of a delivery by shared/amqp_frames.py.

aiormq builds its receiver by the module-level name `aiormq.connection.FrameReceiver` when a
connection opens: `install()` points that name here, for every connection opened after it.
"""

import asyncio
import struct

import aiormq.connection
from aiormq.connection import ReceivedFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.exceptions import PAMQPException

from shared import amqp_frames

_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
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


def install() -> None:
    """Connections opened from now on read their frames with BufferedFrameReceiver."""
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]
