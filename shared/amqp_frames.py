"""Decoding the three frames of a delivery (its Basic.Deliver, content header and body) straight
from their bytes, into the objects pamqp would build.

pamqp decodes any frame by walking its class's fields and dispatching each on its type name,
through a function call and a copy of what is left per field: about 1,700 bytecodes for a
delivery's three frames, a third of a worker's Python work when a message carries one purchase.
Here those three are read at known offsets, the rest of what a broker sends (confirms, RPC
replies, heartbeats) still by pamqp.

What pamqp decodes, this decodes to equal objects, field for field (tests/shared/
test_amqp_frames.py holds the two to each other over generated frames and their corruptions).
Whatever this cannot decode goes to pamqp as it is, so a malformed frame fails as pamqp fails it.
(One difference: a header table nested some five hundred deep, which exhausts pamqp's stack a few
calls deeper than here, may decode here where pamqp raises RecursionError.)
"""

import struct
from collections.abc import Callable

import pamqp.frame
from aiormq.connection import ReceivedFrame
from pamqp import commands, constants, decode
from pamqp.body import ContentBody
from pamqp.common import FieldValue
from pamqp.header import ContentHeader

from shared.kept import keep

HEAD = struct.Struct(">BHI")  # a frame's type, channel and payload size, before its payload
_PAYLOAD = HEAD.size
# pamqp's own formats for each field (pamqp.common.Struct), signed where pamqp's are.
_METHOD_INDEX = struct.Struct(">l")
_DELIVERY_TAG = struct.Struct(">q")
_CONTENT_HEADER = struct.Struct(">HHQ")
_FLAG_WORD = struct.Struct(">h")

_Deliver = commands.Basic.Deliver
_Properties = commands.Basic.Properties
_DELIVER_INDEX = _Deliver.index

_Decoder = Callable[[bytes], tuple[int, FieldValue]]
# Each property's name, flag and type, in the order pamqp decodes them.
_PROPERTY_TYPES = [
    (name, _Properties.flags[name], getattr(_Properties, "_" + name))
    for name in _Properties.__slots__
]
# The properties present under each flags value seen, each with its decoder (None: a short
# string, read in place): a publisher sets the same few on every message.
_LAYOUTS: dict[int, tuple[tuple[str, _Decoder | None], ...]] = {}
_LAYOUTS_MAX = 256
_OCTET = decode.octet


def unmarshal(data: bytes, start: int, end: int) -> ReceivedFrame:
    """The frame in data[start:end] (a whole one, header to frame-end octet), as
    pamqp.frame.unmarshal returns it."""
    kind, channel, size = HEAD.unpack_from(data, start)
    if size and data[end - 1] == constants.FRAME_END:
        try:
            if kind == constants.FRAME_BODY:
                return end - start, channel, ContentBody(data[start + _PAYLOAD : end - 1])
            if kind == constants.FRAME_HEADER:
                return end - start, channel, _header(data[start + _PAYLOAD : end - 1])
            if (
                kind == constants.FRAME_METHOD
                and _METHOD_INDEX.unpack_from(data, start + _PAYLOAD)[0] == _DELIVER_INDEX
            ):
                return end - start, channel, _deliver(data[start + _PAYLOAD + 4 : end - 1])
        except (struct.error, ValueError, IndexError, KeyError):
            pass  # pamqp says what is wrong with it, below
    return pamqp.frame.unmarshal(data[start:end])


def _deliver(payload: bytes) -> commands.Basic.Deliver:
    """A Basic.Deliver from its arguments' bytes. Built as pamqp's unmarshal leaves one: every
    field set from the frame, none checked (pamqp validates only the empty method it fills).

    A short string is a length octet, then that many bytes of UTF-8, fewer if the payload ends
    first (pamqp reads what is there, and goes on past the length given)."""
    deliver = _Deliver.__new__(_Deliver)
    end = 1 + payload[0]
    deliver.consumer_tag = payload[1:end].decode("utf-8")
    deliver.delivery_tag = _DELIVERY_TAG.unpack(payload[end : end + 8])[0]
    deliver.redelivered = (payload[end + 8] & 1) != 0
    at = end + 9
    end = at + 1 + payload[at]
    deliver.exchange = payload[at + 1 : end].decode("utf-8")
    deliver.routing_key = payload[end + 1 : end + 1 + payload[end]].decode("utf-8")
    return deliver


def _header(payload: bytes) -> ContentHeader:
    class_id, weight, body_size = _CONTENT_HEADER.unpack(payload[0:12])
    at, flags, word = 12, 0, 0
    while True:  # pamqp's flag words: each but the last has its lowest bit set
        if len(payload) - at < 2:
            raise ValueError("Content header flags are truncated")
        partial = _FLAG_WORD.unpack_from(payload, at)[0]
        at += 2
        flags |= partial << (word * 16)
        if not partial & 1:
            break
        word += 1
    properties = _Properties()
    value: FieldValue
    for name, decoder in _LAYOUTS.get(flags) or _layout(flags):
        if decoder is None:  # a short string, as in _deliver
            end = at + 1 + payload[at]
            value = payload[at + 1 : end].decode("utf-8")
            at = end
        elif decoder is _OCTET:
            value = payload[at]
            at += 1
        else:
            consumed, value = decoder(payload[at:])
            at += consumed
        setattr(properties, name, value)
    header = ContentHeader(weight, body_size, properties)
    header.class_id = class_id
    return header


def _layout(flags: int) -> tuple[tuple[str, _Decoder | None], ...]:
    layout = tuple(
        (name, None if kind == "shortstr" else decode.METHODS[kind])
        for name, flag, kind in _PROPERTY_TYPES
        if flags & flag
    )
    # Flags of every kind are a stream of garbage, not a broker: bounded all the same.
    return keep(_LAYOUTS, flags, layout, limit=_LAYOUTS_MAX)
