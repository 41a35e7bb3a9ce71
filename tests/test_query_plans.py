"""Statements that take arrays of ids keep to the indexes while the purchases table grows.

PostgreSQL may keep one generic plan for a prepared statement after five runs. Planned while the
table was small, that plan scans the whole table, testing every row against every id, and it is
kept until the table is analyzed again: a backlog of 100,000 purchases drained 3x slower for it,
and the status listener's read of 2,000 waiters took 1.2 s. So the connections that run them plan
every statement for the array it is given (shared.db.CUSTOM_PLANS): a worker's batch connections
(worker.supervisor.batch_session) and the API's pool of many-row reads (`Resources.reads`).

Each test runs a statement through asyncpg on an empty, analyzed table, lets the table grow to
50,000 rows without an analyze (autovacuum is off for the test), and counts the scans of the next
run in the session's own statistics (pg_stat_xact_user_tables, read before and after it: they
hold what the session has not reported yet, not only that transaction's).
"""

import asyncio
import time
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import asyncpg
import pytest
import pytest_asyncio

from api.main import create_app
from shared.db import STATEMENT_LIFETIME_S
from shared.purchases.repository import (
    SELECT_FINAL_PURCHASE_IDS,
    SELECT_PURCHASE,
    SELECT_PURCHASES_IN_FULL,
)
from shared.settings import Settings
from worker.supervisor import batch_session

# Ids per run: a batch of a steady flow, the waiters one commit wakes. (For hundreds of ids
# against a table of this size, one scan with a hashed list can be the better plan, and the
# planner may choose it: it sees the ids.)
IDS = 20
GROWN_TO = 50_000


def _ids() -> list[UUID]:
    return [uuid4() for _ in range(IDS)]


SCANS = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'purchases'"


@pytest_asyncio.fixture
async def empty_table(db: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """The purchases table known empty, with no analyze to come and replan it."""
    await db.execute("ALTER TABLE purchases SET (autovacuum_enabled = false)")
    await db.execute("ANALYZE purchases")
    yield db
    await db.execute("ALTER TABLE purchases RESET (autovacuum_enabled)")


async def _scans(conn: asyncpg.Connection, statement: str, *args: object) -> tuple[int, int]:
    """(sequential scans, index scans) of purchases by one run of `statement` on `conn`, through
    asyncpg's statement cache as the services run it."""
    async with conn.transaction():
        before = await conn.fetchrow(SCANS)
        assert await conn.fetch(statement, *args) == []
        after = await conn.fetchrow(SCANS)
    assert before is not None
    assert after is not None
    return after["seq_scan"] - before["seq_scan"], after["idx_scan"] - before["idx_scan"]


async def _scans_once_grown(
    conn: asyncpg.Connection, db: asyncpg.Pool, statement: str, *args: object
) -> tuple[int, int]:
    """The scans of `statement` run once more after the table grew, having run ten times on
    `conn` while it was empty (all within a cached statement's lifetime in the services' pools,
    or the pool would have prepared it again and proved nothing)."""
    started = time.monotonic()
    for _ in range(10):
        assert await conn.fetch(statement, *args) == []
    await db.execute(
        "INSERT INTO purchases (id, event_id, customer_id, quantity, status, accepted_at,"
        " partition) SELECT gen_random_uuid(), $1, 'c', 1, 'rejected', now(), 0"
        " FROM generate_series(1, $2)",
        uuid4(),
        GROWN_TO,
    )
    scans = await _scans(conn, statement, *args)
    if time.monotonic() - started >= STATEMENT_LIFETIME_S:
        pytest.fail("the statement ran past its cached lifetime: the table grew too slowly here")
    return scans


async def _scans_in_session(
    settings: Settings, db: asyncpg.Pool, session: dict[str, str], statement: str
) -> tuple[int, int]:
    conn = await asyncpg.connect(settings.database_url, server_settings=session)
    try:
        return await _scans_once_grown(conn, db, statement, _ids())
    finally:
        await conn.close()


async def test_a_workers_batch_session_plans_for_the_table_as_it_is_now(
    settings: Settings, empty_table: asyncpg.Pool
) -> None:
    seq_scans, index_scans = await _scans_in_session(
        settings, empty_table, batch_session(settings), SELECT_FINAL_PURCHASE_IDS
    )
    assert seq_scans == 0
    assert index_scans >= 1  # (one per id looked up, as PostgreSQL counts them)


async def test_the_apis_many_row_reads_plan_for_the_table_as_it_is_now(
    settings: Settings, empty_table: asyncpg.Pool
) -> None:
    """On the pool the API's listener reads its waiters' purchases with."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        resources = app.state.resources
        assert resources.purchases._many_reads is resources.reads
        async with resources.reads.acquire() as conn:
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
            seq_scans, index_scans = await _scans_once_grown(
                conn, empty_table, SELECT_PURCHASES_IN_FULL, _ids()
            )
    assert seq_scans == 0
    assert index_scans >= 1


@pytest.mark.parametrize("statement", [SELECT_FINAL_PURCHASE_IDS, SELECT_PURCHASES_IN_FULL])
async def test_a_default_session_would_keep_scanning_the_whole_table(
    settings: Settings, empty_table: asyncpg.Pool, statement: str
) -> None:
    """What the setting prevents, so that the tests above can fail."""
    seq_scans, index_scans = await _scans_in_session(settings, empty_table, {}, statement)
    assert (seq_scans, index_scans) == (1, 0)


async def test_the_apis_one_row_reads_are_planned_again_within_seconds(
    settings: Settings, empty_table: asyncpg.Pool
) -> None:
    """A status read of one id keeps its cached plan (planning each read costs a fifth of the
    poll rate), but the services' pools prepare their statements again every
    STATEMENT_LIFETIME_S: a plan kept from the small table scans the grown one only that long."""
    app = create_app(settings)
    async with app.router.lifespan_context(app), app.state.resources.pool.acquire() as conn:
        stale = await _scans_once_grown(conn, empty_table, SELECT_PURCHASE, uuid4())
        await asyncio.sleep(STATEMENT_LIFETIME_S + 0.5)
        fresh = await _scans(conn, SELECT_PURCHASE, uuid4())
    assert stale == (1, 0)  # the plan kept from the empty table, as the default session's
    assert fresh[0] == 0
    assert fresh[1] >= 1
