"""The test databases' recycling (tests/databases.py): a database is handed out again only when
it is the template but for its rows, and then without them."""

from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from tests.conftest import RUN_ID, Services, with_database
from tests.databases import TestDatabases


@pytest_asyncio.fixture
async def pool(services: Services, template_database: str) -> AsyncIterator[TestDatabases]:
    databases = TestDatabases(services.database_url, template_database)
    yield databases
    databases.drop_all()


async def _fetchval(services: Services, database: str, query: str, *args: object) -> object:
    """`query`'s first value, on a connection of its own to `database`."""
    conn = await asyncpg.connect(with_database(services.database_url, database))
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def _exists(services: Services, name: str) -> bool:
    query = "SELECT 1 FROM pg_database WHERE datname = $1"
    return bool(await _fetchval(services, "postgres", query, name))


async def _used(services: Services, pool: TestDatabases, tag: str, statement: str) -> str:
    """A database from the pool, given back after `statement` ran in it; its name."""
    name = await pool.acquire(f"ticketing_test_{RUN_ID}_recycle_{tag}")
    await _fetchval(services, name, statement)
    await pool.release(name)
    return name


async def test_a_database_left_with_rows_only_is_handed_out_again_without_them(
    services: Services, pool: TestDatabases
) -> None:
    first = await _used(
        services,
        pool,
        "a",
        "INSERT INTO events (id, name, starts_at, total_tickets, available_tickets, "
        "max_tickets_per_purchase) VALUES (gen_random_uuid(), 'x', now(), 5, 5, 1)",
    )

    again = await pool.acquire(f"ticketing_test_{RUN_ID}_recycle_b")

    assert again == first
    assert pool.recycled == 1
    assert await _fetchval(services, again, "SELECT count(*) FROM events") == 0


async def test_a_database_whose_schema_changed_is_dropped_not_handed_out(
    services: Services, pool: TestDatabases
) -> None:
    first = await _used(services, pool, "c", "ALTER TABLE events ADD COLUMN extra int")

    again = await pool.acquire(f"ticketing_test_{RUN_ID}_recycle_d")

    assert again != first
    assert not await _exists(services, first)


async def test_a_database_still_connected_to_is_dropped_not_handed_out(
    services: Services, pool: TestDatabases
) -> None:
    first = await pool.acquire(f"ticketing_test_{RUN_ID}_recycle_e")
    left_open = await asyncpg.connect(with_database(services.database_url, first))
    try:
        await pool.release(first)
    finally:
        await left_open.close()

    assert not await _exists(services, first)
    assert await pool.acquire(f"ticketing_test_{RUN_ID}_recycle_f") != first
