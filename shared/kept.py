"""Readings kept by what they were read from, for requests that send the same thing again.

The HTTP layer keeps a few such maps (request targets, event ids of purchase paths, header
plans), and the frame decoder one (the layouts of message properties). Each is bounded the same way: once full it is dropped whole and fills again with what
still repeats, so input that never repeats costs one insertion and holds little memory."""

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(readings: dict[K, V], key: K, value: V, *, limit: int) -> V:
    """Add `value` under `key`, first dropping everything if `limit` entries are kept already."""
    if len(readings) >= limit:
        readings.clear()
    readings[key] = value
    return value
