"""Every long-lived resource of the API, opened and closed in one place by the lifespan."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from shared import broker
from shared.broker_nodes import BrokerLink
from shared.cluster_config import agree_on_partitions
from shared.db import CUSTOM_PLANS, create_pool
from shared.events.cache import EventCache
from shared.events.service import EventService
from shared.publisher import PurchasePublisher
from shared.purchases.changes import StatusWaiters
from shared.purchases.ids import PurchaseIds
from shared.purchases.models import Purchase
from shared.purchases.service import PurchaseService, RecentlyAccepted
from shared.settings import DEV_PURCHASE_ID_SECRET, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    reads: asyncpg.Pool  # the status listener's reads of many purchases at once
    broker: BrokerLink
    publisher: PurchasePublisher
    events: EventService
    purchases: PurchaseService
    waiters: StatusWaiters[Purchase]


def _placeholder(secret: str) -> bool:
    """The development default, or a value the examples ship (compose's, the k8s example's)."""
    return secret == DEV_PURCHASE_ID_SECRET or "change-me" in secret.lower()


@asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[Resources]:
    if _placeholder(settings.purchase_id_secret):
        log.warning(
            "PURCHASE_ID_SECRET is a placeholder (the development default, or a change-me of an "
            "example): anyone can forge purchase ids; set a long random secret in production"
        )
    pool = await create_pool(settings)
    try:
        # Planned for each array of ids (shared.db.CUSTOM_PLANS). A status read of one id stays
        # on `pool`: planning each of those would cost about a fifth of the poll rate.
        reads = await create_pool(settings, server_settings=CUSTOM_PLANS, size=(1, 2))
    except BaseException:
        await pool.close()
        raise
    try:
        async with pool.acquire() as conn:
            await agree_on_partitions(conn, settings.partitions)
        publisher = PurchasePublisher(
            broker.Topology.from_settings(settings),
            timeout_s=settings.publish_timeout_s,
            max_in_flight=settings.publish_max_in_flight,
            linger_s=settings.publish_linger_ms / 1000,
            full_batch=settings.publish_full_batch,
        )
        link = BrokerLink(settings, "api", on_connected=publisher.start, on_lost=publisher.detach)
        publisher.on_unconfirmed = link.suspect
        try:
            await link.start(wait_s=settings.startup_timeout_s)
            event_service = EventService(pool)
            cache = EventCache(event_service.find_many, ttl_s=settings.event_cache_ttl_s)
            waiters: StatusWaiters[Purchase] = StatusWaiters(
                settings.database_url, max_waiters=settings.status_max_waiters
            )
            await waiters.start()
            try:
                yield Resources(
                    settings=settings,
                    pool=pool,
                    reads=reads,
                    broker=link,
                    publisher=publisher,
                    events=event_service,
                    purchases=PurchaseService(
                        pool=pool,
                        many_reads=reads,
                        events=cache,
                        publisher=publisher,
                        ids=PurchaseIds(settings.purchase_id_secret),
                        recent=RecentlyAccepted(),
                        waiters=waiters,
                    ),
                    waiters=waiters,
                )
            finally:
                await waiters.close()
        finally:
            await publisher.close()
            await link.close()
    finally:
        try:
            await reads.close()
        finally:
            await pool.close()
