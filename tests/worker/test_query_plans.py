"""A batch's statements keep to the indexes while the purchases table grows from empty.

PostgreSQL may keep one generic plan for a prepared statement after five runs. Planned while the
table was empty, that plan scans the whole table, and it is kept until the table is analyzed
again: a backlog of 100,000 purchases drained 3x slower for it. The worker's connections plan
every statement for the arrays it is given (worker.supervisor.batch_session).

Each test runs the worker's own duplicate check through asyncpg on an empty, analyzed table, lets
the table grow to 50,000 rows without an analyze (autovacuum is off for the test), and counts the
scans of the next run in the session's own statistics (pg_stat_xact_user_tables, read before and
after it: they hold what the session has not reported yet, not only that transaction's).
"""

from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest_asyncio

from shared.purchases.repository import SELECT_FINAL_PURCHASE_IDS
from shared.settings import Settings
from worker.supervisor import batch_session

# Ids in the duplicate check: a batch of a steady flow. (For hundreds of ids against a table of
# this size, one scan with a hashed list can be the better plan, and the planner may choose it.)
BATCH = 20
GROWN_TO = 50_000

SCANS = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'purchases'"


@pytest_asyncio.fixture
async def empty_table(db: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """The purchases table known empty, with no analyze to come and replan it."""
    await db.execute("ALTER TABLE purchases SET (autovacuum_enabled = false)")
    await db.execute("ANALYZE purchases")
    yield db
    await db.execute("ALTER TABLE purchases RESET (autovacuum_enabled)")


async def _scans_once_grown(
    settings: Settings, db: asyncpg.Pool, session: dict[str, str]
) -> tuple[int, int]:
    """(sequential scans, index scans) of purchases by the duplicate check, prepared and run ten
    times on the empty table in a session with `session`'s settings, then run once more after
    the table grew."""
    conn = await asyncpg.connect(settings.database_url, server_settings=session)
    try:
        check = await conn.prepare(SELECT_FINAL_PURCHASE_IDS)
        ids = [uuid4() for _ in range(BATCH)]
        for _ in range(10):
            assert await check.fetch(ids) == []
        await db.execute(
            "INSERT INTO purchases (id, event_id, customer_id, quantity, status, accepted_at,"
            " partition) SELECT gen_random_uuid(), $1, 'c', 1, 'rejected', now(), 0"
            " FROM generate_series(1, $2)",
            uuid4(),
            GROWN_TO,
        )
        async with conn.transaction():
            before = await conn.fetchrow(SCANS)
            assert await check.fetch(ids) == []
            after = await conn.fetchrow(SCANS)
        assert before is not None
        assert after is not None
        return after["seq_scan"] - before["seq_scan"], after["idx_scan"] - before["idx_scan"]
    finally:
        await conn.close()


async def test_the_workers_sessions_plan_for_the_table_as_it_is_now(
    settings: Settings, empty_table: asyncpg.Pool
) -> None:
    seq_scans, index_scans = await _scans_once_grown(settings, empty_table, batch_session(settings))
    assert seq_scans == 0
    assert index_scans >= 1  # (one per id looked up, as PostgreSQL counts them)


async def test_a_default_session_would_keep_scanning_the_whole_table(
    settings: Settings, empty_table: asyncpg.Pool
) -> None:
    """What the setting prevents, so that the test above can fail."""
    seq_scans, index_scans = await _scans_once_grown(settings, empty_table, {})
    assert (seq_scans, index_scans) == (1, 0)
