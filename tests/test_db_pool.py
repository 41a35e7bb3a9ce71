"""The pool skips asyncpg's per-release session reset (nothing here sets session state), but a
connection handed back with a transaction still open must come back rolled back."""

from shared.db import create_pool
from shared.settings import Settings


async def test_connection_released_mid_transaction_comes_back_rolled_back(
    settings: Settings,
) -> None:
    pool = await create_pool(settings.model_copy(update={"db_pool_min": 1, "db_pool_max": 1}))
    try:
        connection = await pool.acquire()
        await connection.execute("BEGIN")
        await connection.execute("CREATE TABLE left_open (id int)")
        await pool.release(connection)

        async with pool.acquire() as again:
            assert not again.is_in_transaction()
            exists = await again.fetchval("SELECT to_regclass('left_open') IS NOT NULL")
        assert exists is False, "the open transaction was committed instead of rolled back"
    finally:
        await pool.close()


async def test_pool_connections_keep_their_session_settings(settings: Settings) -> None:
    # Settings given at connect are the session's defaults: releases must not lose them.
    pool = await create_pool(
        settings.model_copy(update={"db_pool_min": 1, "db_pool_max": 1}),
        server_settings={"idle_in_transaction_session_timeout": "4321"},
    )
    try:
        for _ in range(3):
            async with pool.acquire() as connection:
                value = await connection.fetchval("SHOW idle_in_transaction_session_timeout")
                assert value == "4321ms"
    finally:
        await pool.close()
