"""Marks dead-lettered purchases `failed`, so a client polling them gets an answer.

The dead-letter exchange fans out to two queues: one keeps the messages for inspection and
replay, the other (read here, by every worker) only records what died and why.
"""

import logging
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pydantic import ValidationError

from shared.broker import Topology
from shared.messages import PurchaseMessage, readable_purchase_ids
from shared.purchases import repository as purchases
from shared.purchases.models import FailReason, PurchaseStatus
from shared.retry import TRANSIENT_DATABASE, until_stopped
from worker import metrics

log = logging.getLogger(__name__)

REASONS = {
    # Workers reject what they cannot read, and, once they recorded its purchases failed with
    # the reason, a message of another partition or one whose records keep conflicting.
    "rejected": FailReason.UNDECODABLE_MESSAGE,
    "delivery_limit": FailReason.DELIVERY_LIMIT_EXCEEDED,
}


def death_reason(headers: dict[str, Any]) -> FailReason:
    raw = headers.get("x-first-death-reason")
    deaths = headers.get("x-death")
    if raw is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        raw = deaths[0].get("reason")
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    return REASONS.get(str(raw), FailReason.DEAD_LETTERED)


class DeadLetterRecorder:
    def __init__(self, pool: asyncpg.Pool, topology: Topology) -> None:
        self._pool = pool
        self._topology = topology
        self._channel: AbstractChannel | None = None
        self._stopped = False
        self.recorded = 0

    async def start(self, connection: AbstractConnection) -> None:
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=16)
        queue = await self._channel.get_queue(self._topology.dead_letter_record_queue)
        await queue.consume(self._record)

    async def stop(self) -> None:
        self._stopped = True
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _record(self, message: AbstractIncomingMessage) -> None:
        reason = death_reason(dict(message.headers or {}))
        if reason != FailReason.UNDECODABLE_MESSAGE:  # those were counted when rejected
            metrics.DEAD_LETTERS.labels(reason.value).inc()
        # Any database error is retried (a failover's read-only spell, a full disk): dropping
        # the record would leave its purchases pending forever. What we send is validated, so
        # an error that waiting cannot cure is not expected here.
        retryable: tuple[type[BaseException], ...] = (*TRANSIENT_DATABASE, asyncpg.PostgresError)
        try:
            async for attempt in until_stopped(retryable, lambda: self._stopped):
                with attempt:
                    self.recorded += await self._record_failed(message.body, reason)
        except retryable:
            return  # stopping before it could be recorded: unacked, so it is redelivered
        await message.ack()

    @property
    def broken(self) -> bool:
        """The broker closed the channel under it: the supervisor starts a new one."""
        return self._channel is not None and self._channel.is_closed and not self._stopped

    async def _record_failed(self, body: bytes, reason: FailReason) -> int:
        """Mark the message's purchases failed; return how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                decoded = PurchaseMessage.from_body(body)
            except ValidationError:
                ids = readable_purchase_ids(body)
                await purchases.record_failed_ids(conn, ids, reason=reason)
                log.warning(
                    "dead letter (%s) undecodable: %d id(s) readable", reason.value, len(ids)
                )
                return len(ids)
            if reason == FailReason.UNDECODABLE_MESSAGE:
                # Readable, so set aside on purpose by a worker, which logged why, recorded its
                # purchases failed with that reason (wrong_partition, record_conflict) and kept
                # its confirmations' holds before rejecting it: this never overwrites a status,
                # and keeps what the worker could not keep yet (a purchase decided after).
                await purchases.record_failed_purchases(
                    conn,
                    decoded.purchases,
                    reason=FailReason.DEAD_LETTERED,
                    partition=decoded.partition,
                )
                holds = await purchases.keep_holds(conn, decoded.confirmations)
                log.info(
                    "dead letter set aside by a worker: %d purchase(s), recorded failed by it",
                    len(decoded.purchases),
                )
            else:
                await purchases.record_failed_purchases(
                    conn, decoded.purchases, reason=reason, partition=decoded.partition
                )
                holds = await purchases.keep_holds(conn, decoded.confirmations)
                log.warning(
                    "dead letter (%s): %d purchase(s) marked failed",
                    reason.value,
                    len(decoded.purchases),
                )
        # (A message a worker set aside comes back as `rejected`, whatever the worker's reason.)
        _report_confirmations(
            holds,
            FailReason.DEAD_LETTERED if reason == FailReason.UNDECODABLE_MESSAGE else reason,
        )
        return len(decoded.purchases)


_KEPT: tuple[int, str] = (
    logging.WARNING,
    "dead letter: a confirmation's hold is kept until replay-dead-letters",
)
# What a hold not kept says of its confirmation, by the purchase's status (None: no row yet).
_NOT_KEPT: dict[str | None, tuple[int, str]] = {
    PurchaseStatus.EXPIRED: (
        logging.ERROR,
        "dead letter: a confirmation's hold expired before it could be kept; the purchase stays "
        "expired",
    ),
    PurchaseStatus.HELD: (
        logging.WARNING,
        "dead letter: a confirmation accepted after its hold's end (replayed, it expires the "
        "purchase)",
    ),
    PurchaseStatus.FAILED: (
        logging.INFO,
        "dead letter: a confirmation of a purchase dead-lettered too (replayed in order, both are "
        "decided)",
    ),
    None: (
        logging.WARNING,
        "dead letter: a confirmation of a purchase not recorded yet; a hold it is given is not "
        "kept: replay before it ends",
    ),
}


def _report_confirmations(holds: list[purchases.HoldOfConfirmation], reason: FailReason) -> None:
    """Say what became of the holds of dead-lettered confirmations: kept until the dead letter is
    replayed; or lost with it, when the partition's owner expired the hold first (the broker
    dead-lettered the confirmation before any worker could keep it)."""
    for hold in holds:
        said = _KEPT if hold.kept else _NOT_KEPT.get(hold.status)
        if said is None:
            continue  # confirmed, cancelled, rejected: nothing was at stake
        level, message = said
        log.log(
            level, message, extra={"purchase_id": str(hold.purchase_id), "reason": reason.value}
        )
