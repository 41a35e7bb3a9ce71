"""Prometheus metrics of the worker, served on WORKER_METRICS_PORT."""

import contextlib
import logging
from functools import cache

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import Counter as CounterChild

log = logging.getLogger(__name__)

PURCHASES = Counter(
    "ticketing_worker_purchases_total",
    "Status changes applied, by the status reached and its reason (a purchase held, then "
    "confirmed, counts once under each)",
    ["status", "reason"],
)
DUPLICATES = Counter(
    "ticketing_worker_duplicate_purchases_total",
    "Purchases skipped because their id was already decided (redelivery, idempotent retry)",
)
BATCH_SIZE = Histogram(
    "ticketing_worker_batch_purchases",
    "Commands (purchases, confirmations, cancellations) per committed batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
COMMIT_SECONDS = Histogram(
    "ticketing_worker_commit_seconds",
    "Time to apply one batch (one transaction, retries included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LAG_SECONDS = Gauge(
    "ticketing_worker_lag_seconds",
    "Age of the oldest command in the batch last applied, per partition held; 0 once the "
    "partition is idle",
    ["partition"],
)
PARTITIONS_OWNED = Gauge("ticketing_worker_partitions_owned", "Partition leases held")
LEASES_ACQUIRED = Counter("ticketing_worker_leases_acquired_total", "Partition leases taken")
LEASE_TAKEOVERS = Counter(
    "ticketing_worker_lease_takeovers_total",
    "Leases taken from another worker whose lease had expired",
)
LEASES_LOST = Counter(
    "ticketing_worker_leases_lost_total", "Leases found taken over by another worker"
)
REDELIVERIES = Counter(
    "ticketing_worker_redeliveries_total", "Messages received that the broker had delivered before"
)
DEAD_LETTERS = Counter(
    "ticketing_worker_dead_letters_total",
    "Messages dead-lettered (rejected as undecodable here, or seen in the record queue)",
    ["reason"],
)


@cache
def decided(status: str, reason: str) -> CounterChild:
    """PURCHASES for one (status, reason): looked up once, counted often."""
    return PURCHASES.labels(status, reason)


def forget_partition(partition: int) -> None:
    """A partition this worker no longer consumes: its lag is for its next owner to report,
    and a value left here would stay as it was for as long as this worker runs."""
    with contextlib.suppress(KeyError):
        LAG_SECONDS.remove(str(partition))


def serve_metrics(port: int) -> None:
    if port == 0:
        return
    try:
        start_http_server(port)
    except OSError as exc:  # e.g. a second worker on the same host
        log.warning("worker metrics not served on port %d: %s", port, exc)
        return
    log.info("worker metrics on :%d/metrics", port)
