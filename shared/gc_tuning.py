"""Garbage-collector settings for a long-running service under a flood of small requests.

Every request allocates many short-lived objects; with CPython's defaults the full (oldest
generation) collections that follow scan every object the process holds, and show up as latency
spikes at the 99th percentile. Freezing what start-up created moves it out of those scans, and a
larger young-generation threshold makes the collections rarer.
"""

import gc

YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Call once the long-lived state (pools, caches, app) exists."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 100)
