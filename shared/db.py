"""The PostgreSQL connection pool."""

import asyncio
import logging
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from shared.retry import DATABASE_UNAVAILABLE, wait_for_service
from shared.settings import Settings

log = logging.getLogger(__name__)

# The session settings of connections whose statements take arrays of ids (a worker's batch, the
# status listener's read of every waiter a commit woke): every statement planned for the array
# it is given. PostgreSQL may otherwise keep one generic plan per prepared statement after five
# runs. Kept while the purchases table was small (a new deployment, a quiet period's last
# analyze), that plan scans the whole table, testing every row against every id, until
# autovacuum next analyzes it: measured here, 1.2 s to read 2,000 ids among 100,000 rows.
CUSTOM_PLANS = {"plan_cache_mode": "force_custom_plan"}
# Everywhere else (a status read of one id, where planning each read costs a fifth of the poll
# rate), a prepared statement is dropped and prepared again this often (asyncpg's default: 300),
# so a plan kept from a small table lasts seconds, not until autovacuum's next visit.
STATEMENT_LIFETIME_S = 5


async def create_pool(
    settings: Settings,
    *,
    wait_s: float = 30.0,
    server_settings: dict[str, str] | None = None,
    size: tuple[int, int] | None = None,
    command_timeout_s: float = 30.0,
) -> asyncpg.Pool:
    """A pool of DATABASE_URL connections, DB_POOL_MIN..DB_POOL_MAX of them unless `size` says
    otherwise (min, max)."""
    min_size, max_size = size or (settings.db_pool_min, settings.db_pool_max)
    async for attempt in wait_for_service("postgresql", DATABASE_UNAVAILABLE, wait_s):
        with attempt:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                settings.database_url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout_s,
                # A database that does not answer must fail fast (503), not hang a request.
                timeout=5,
                server_settings=server_settings,
                max_cached_statement_lifetime=STATEMENT_LIFETIME_S,
                reset=_keep_session,
            )
    return pool


async def database_answers(pool: asyncpg.Pool, *, timeout_s: float) -> bool:
    """Whether the pool gives a connection that answers a query within `timeout_s`; a failure is
    logged, not raised (a readiness probe asks this)."""
    try:
        async with asyncio.timeout(timeout_s):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except Exception as exc:
        log.warning("readiness: postgresql unavailable: %r", exc)
        return False
    return True


# What repositories take: a plain connection or one borrowed from the pool.
if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection


async def _keep_session(connection: Connection) -> None:
    """Nothing here changes session state (no SET, LISTEN, advisory locks or cursors), so the
    default reset on every release, one more round trip (`RESET ALL`, `UNLISTEN *`, ...), buys
    nothing. asyncpg still rolls back a transaction left open before calling this."""
