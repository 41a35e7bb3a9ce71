"""A delivery's frames decode to what pamqp decodes them to, field for field; and a frame that
pamqp refuses is refused in pamqp's words, whatever is wrong with it. Deterministic: the frames
and their corruptions come from a seeded generator."""

import random
import re
import struct
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from shared import amqp_frames

SEED = 20261207
_HEAD = struct.Struct(">BHI")


def fields(frame: object) -> Any:
    """Everything a frame holds, comparable: its type and each field (the properties' too)."""
    if isinstance(frame, ContentHeader):
        return (
            ContentHeader,
            frame.class_id,
            frame.weight,
            frame.body_size,
            fields(frame.properties),
            sorted(vars(frame)),
        )
    if isinstance(frame, ContentBody):
        return ContentBody, frame.value
    slots = getattr(type(frame), "__slots__", ())
    # By repr: == would take True for 1 and 1.0 for 1.
    return type(frame), [(name, repr(getattr(frame, name, "<unset>"))) for name in slots]


def refused(exc: Exception) -> tuple[type, str]:
    """An error, comparable: its type and its words (without the address of the frame object
    that pamqp names in them)."""
    return type(exc), re.sub(r" at 0x[0-9a-f]+", "", str(exc))


def decoded(data: bytes, start: int = 0, end: int | None = None) -> Any:
    """What amqp_frames makes of data[start:end]: its frame, or the error it raises."""
    try:
        weight, channel, frame = amqp_frames.unmarshal(
            data, start, len(data) if end is None else end
        )
    except Exception as exc:
        return refused(exc)
    return weight, channel, fields(frame)


def by_pamqp(frame: bytes) -> Any:
    try:
        weight, channel, value = pamqp.frame.unmarshal(frame)
    except Exception as exc:
        return refused(exc)
    return weight, channel, fields(value)


def text(rng: random.Random, longest: int = 40) -> str:
    alphabet = "abcXYZ019.-_:/ é漢🎟"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))


def short_text(rng: random.Random) -> str:
    """Text of at most 255 bytes in UTF-8: what fits a short string."""
    value = text(rng, 60)
    while len(value.encode()) > 255:
        value = value[:-1]
    return value


def table(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    values: list[Any] = [
        rng.randrange(-(2**31), 2**31),
        rng.random() < 0.5,
        short_text(rng),
        Decimal("12.34"),
        datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
        None,
        [1, "two", 3.5],
    ]
    if depth < 2:
        values.append(table(rng, depth + 1))
    return {f"x-{short_text(rng)[:20]}{n}": rng.choice(values) for n in range(rng.randrange(4))}


def properties(rng: random.Random, share: float = 0.5) -> commands.Basic.Properties:
    """A random subset of every property (each given with the chance `share`), each of its own
    type."""
    choices: dict[str, Any] = {
        "content_type": short_text(rng),
        "content_encoding": short_text(rng),
        "headers": table(rng),
        "delivery_mode": rng.choice([1, 2]),
        "priority": rng.randrange(256),
        "correlation_id": short_text(rng),
        "reply_to": short_text(rng),
        "expiration": str(rng.randrange(10**6)),
        "message_id": short_text(rng),
        "timestamp": datetime(2026, 12, 7, rng.randrange(24), tzinfo=UTC),
        "message_type": short_text(rng),
        "user_id": short_text(rng),
        "app_id": short_text(rng),
    }
    return commands.Basic.Properties(
        **{name: value for name, value in choices.items() if rng.random() < share}
    )


def delivery_frames(rng: random.Random) -> list[bytes]:
    """A delivery's frames, on a random channel: method, content header, body."""
    channel = rng.randrange(1, 65536)
    body = rng.randbytes(rng.randrange(1, 300))
    deliver = commands.Basic.Deliver(
        consumer_tag=short_text(rng),
        delivery_tag=rng.choice([1, rng.randrange(2**63)]),
        redelivered=rng.random() < 0.5,
        exchange=rng.choice(["", "ticketing.purchases", "amq.direct"]),
        routing_key=short_text(rng),
    )
    return [
        pamqp.frame.marshal(deliver, channel),
        pamqp.frame.marshal(ContentHeader(0, len(body), properties(rng)), channel),
        pamqp.frame.marshal(ContentBody(body), channel),
    ]


def generated(count: int) -> list[bytes]:
    rng = random.Random(SEED)
    frames: list[bytes] = []
    for _ in range(count):
        frames += delivery_frames(rng)
    return frames


def with_payload(frame: bytes, payload: bytes) -> bytes:
    """The frame with another payload, its size field and frame-end octet made to fit it (as
    the receiver cuts frames by that size)."""
    kind, channel, _ = _HEAD.unpack_from(frame)
    return _HEAD.pack(kind, channel, len(payload)) + payload + frame[-1:]


def corruptions(frame: bytes, rng: random.Random) -> list[bytes]:
    payload = frame[_HEAD.size : -1]
    cut = [with_payload(frame, payload[:n]) for n in range(len(payload))]
    flipped = []
    for _ in range(12):
        at = rng.randrange(len(payload))
        value = bytes([payload[at] ^ (1 << rng.randrange(8))])
        flipped.append(with_payload(frame, payload[:at] + value + payload[at + 1 :]))
    # A length octet made longer than what follows it, and bytes that are not UTF-8.
    grown = with_payload(frame, payload[:4] + b"\xff" + payload[5:])
    not_utf8 = with_payload(frame, payload.replace(b"a", b"\xc3(", 1))
    return [*cut, *flipped, grown, not_utf8, frame[:-1] + b"\x00"]


def test_deliveries_decode_as_pamqp_decodes_them() -> None:
    frames = generated(400)
    for frame in frames:
        assert decoded(frame) == by_pamqp(frame), frame
    kinds = {by_pamqp(frame)[2][0] for frame in frames}
    assert kinds == {commands.Basic.Deliver, ContentHeader, ContentBody}


def test_a_delivery_from_an_earlier_version_of_itself_decodes_the_same_twice() -> None:
    """The properties' layouts are kept by their flags: the second decoding reads the kept one."""
    frames = generated(50)
    first = [decoded(frame) for frame in frames]
    assert [decoded(frame) for frame in frames] == first == [by_pamqp(f) for f in frames]


def test_corrupted_frames_fail_or_decode_as_pamqp_does() -> None:
    rng = random.Random(SEED + 1)
    outcomes = set()
    for frame in generated(40):
        for broken in corruptions(frame, rng):
            expected = by_pamqp(broken)
            assert decoded(broken) == expected, broken
            outcomes.add(isinstance(expected[0], type) and issubclass(expected[0], Exception))
    assert outcomes == {True, False}  # some decode (pamqp is lenient), most fail


def test_a_frame_is_read_where_it_lies_in_the_buffer() -> None:
    frames = generated(20)
    data = b"".join(frames)
    start = 0
    for frame in frames:
        assert decoded(data, start, start + len(frame)) == by_pamqp(frame)
        start += len(frame)


@pytest.mark.parametrize(
    "frame",
    [
        pamqp.frame.marshal(commands.Basic.Ack(7, multiple=True), 3),
        pamqp.frame.marshal(commands.Basic.ConsumeOk("ctag"), 3),
        pamqp.frame.marshal(commands.Channel.Close(404, "NOT_FOUND", 60, 40), 3),
        pamqp.frame.marshal(Heartbeat(), 0),
        _HEAD.pack(3, 1, 0) + b"\xce",  # a body frame of no size: pamqp refuses it
        _HEAD.pack(9, 1, 2) + b"ab\xce",  # no such frame type
    ],
)
def test_other_frames_are_pamqps(frame: bytes) -> None:
    assert decoded(frame) == by_pamqp(frame)


def test_every_layout_of_properties_decodes_as_pamqp_decodes_it() -> None:
    """Each of the 8,192 combinations of the properties a publisher may set (cluster_id must be
    empty, so is never sent)."""
    rng = random.Random(SEED + 2)
    every = properties(rng, share=1.0)
    names = [name for name in commands.Basic.Properties.__slots__ if name != "cluster_id"]
    assert len(names) == 13
    for chosen in range(1 << len(names)):
        given = {name: getattr(every, name) for n, name in enumerate(names) if chosen >> n & 1}
        header = ContentHeader(0, 10, commands.Basic.Properties(**given))
        frame = pamqp.frame.marshal(header, 1)
        assert decoded(frame) == by_pamqp(frame)
        assert by_pamqp(frame)[2][0] is ContentHeader


def test_chained_flag_words_decode_as_pamqp_decodes_them() -> None:
    """A content header's flags run on into further words while a word's lowest bit is set;
    pamqp knows no property past the first word, but reads every word."""
    rng = random.Random(SEED + 4)
    for _ in range(300):
        given = properties(rng)
        single = pamqp.frame.marshal(ContentHeader(0, 10, given), 1)[_HEAD.size : -1]
        (first,) = struct.unpack_from(">H", single, 12)
        words = [first | 1]
        for _ in range(rng.randrange(1, 4)):
            words.append(rng.randrange(1 << 16) | 1)
        words[-1] &= 0xFFFE  # the last word ends the chain
        flags = struct.pack(f">{len(words)}H", *words)
        payload = single[:12] + flags + single[14:]
        frame = _HEAD.pack(2, 1, len(payload)) + payload + b"\xce"
        expected = by_pamqp(frame)
        assert expected[2][0] is ContentHeader
        assert decoded(frame) == expected


def test_the_kept_layouts_are_bounded() -> None:
    """Frames of ever new flags (garbage, not a broker's) keep at most _LAYOUTS_MAX layouts, and
    still decode, or fail, as pamqp does."""
    rng = random.Random(SEED + 3)
    for flags in range(0, 1 << 16, 4):  # the properties' bits: bit 1 is unused, bit 0 chains words
        payload = struct.pack(">HHQH", 60, 0, 0, flags) + rng.randbytes(rng.randrange(16, 96))
        frame = _HEAD.pack(2, 1, len(payload)) + payload + b"\xce"
        assert decoded(frame) == by_pamqp(frame)
        assert len(amqp_frames._LAYOUTS) <= amqp_frames._LAYOUTS_MAX
