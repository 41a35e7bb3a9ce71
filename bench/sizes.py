"""How big each benchmark scenario is, in a full run and a quick one."""

from dataclasses import dataclass

# Purchases per message in the coalesced drain: what the API's publisher packs under a flood of
# one event (the flash sale reports its measured average as publish_purchases_per_message).
COALESCED = 32


@dataclass(frozen=True)
class Sizes:
    drain: int  # purchases queued for one hot event
    accept_s: float  # seconds of load per accept measurement
    flash_requests: int
    flash_tickets: int
    flash_concurrency: int
    baseline_requests: int
    many_events: int
    many_purchases: int
    spread_s: float  # seconds of load per "many events on sale" measurement
    holds_tickets: int  # the flash sale with holds: tickets to sell out
    holds_buyers: int  # buyers at once (each purchases, polls, pays or walks away, again)
    status_purchases: int  # purchases followed by polling, then by long-poll
    waiters: int  # status requests held open on one API process at once
    estimate_s: float  # seconds of a steady flow whose wait estimates are checked


FULL = Sizes(
    100_000,
    6.0,
    50_000,
    20_000,
    256,
    50_000,
    1_000,
    100_000,
    15.0,
    3_000,
    128,
    20_000,
    10_000,
    15.0,
)
QUICK = Sizes(
    20_000, 2.0, 10_000, 4_000, 256, 10_000, 1_000, 20_000, 5.0, 600, 64, 4_000, 2_000, 8.0
)
# Buyers following their purchases' status at once, in the status scenario.
STATUS_BUYERS = 256
# The flash sale with holds: holds this short (set in SQL, below the API's 30 s minimum) so that
# abandoned tickets come back within a run.
HOLD_S = 5
# Many events on sale at once: a buyer picks one at random, one ticket each.
SPREAD_EVENTS = 200
SPREAD_CONNECTIONS = (32, 128)
