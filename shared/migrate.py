"""Create the database if it is missing, then apply the SQL migrations (yoyo) in order.

`python -m shared.migrate` (or `make migrate`). Re-running is a no-op; yoyo records what it
applied and takes a lock, so two processes migrating at once apply each migration once.
"""

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
from psycopg import errors, sql
from yoyo import get_backend, read_migrations

from shared import preflight
from shared.errors import StartupError
from shared.logs import configure_logging
from shared.schema import MIGRATIONS_DIR, database_name
from shared.settings import Settings, get_settings
from shared.urls import where

log = logging.getLogger(__name__)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def create_database_if_missing(url: str) -> bool:
    """Return True when the database had to be created."""
    name = database_name(url)
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except (errors.DuplicateDatabase, errors.UniqueViolation):
            return False  # another process created it first
    return True


def drop_database(url: str) -> None:
    name = database_name(url)
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def apply_migrations(url: str) -> int:
    """Apply pending migrations; return how many were applied."""
    # yoyo picks its driver by the scheme; postgres:// (as libpq and asyncpg take it) too.
    backend = get_backend(urlunsplit(urlsplit(url)._replace(scheme="postgresql+psycopg")))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
    finally:
        backend.connection.close()
    return len(pending)


def wait_for_server(url: str, *, wait_s: float) -> None:
    """Return once PostgreSQL accepts a connection (to its maintenance database: this one may
    not exist yet), retrying for up to `wait_s`; then raise StartupError with one line. A
    server that is still starting (a container's first boot) is waited for, not failed on; one
    that refuses the user or password is said so at once, as the services say it."""
    address = where(url)

    async def connect() -> None:
        # asyncpg, as the services' checks: its errors tell a refused login from a server that
        # is not there (yet), where psycopg raises one OperationalError for both.
        try:
            connection = await asyncpg.connect(_with_database(url, "postgres"), timeout=5)
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
            raise StartupError(
                f"PostgreSQL at {address} refused the user or password in DATABASE_URL."
            ) from None
        await connection.close()

    asyncio.run(
        preflight.until_reachable(
            connect, service="PostgreSQL", where=address, setting="DATABASE_URL", wait_s=wait_s
        )
    )


def migrate(settings: Settings) -> None:
    if create_database_if_missing(settings.database_url):
        log.info("created database %s", database_name(settings.database_url))
    applied = apply_migrations(settings.database_url)
    log.info("migrations applied: %d", applied)


def main() -> None:
    try:
        settings = get_settings()
        configure_logging(settings, service="migrate")
        wait_for_server(settings.database_url, wait_s=settings.startup_timeout_s)
    except StartupError as exc:
        raise SystemExit(f"python -m shared.migrate: {exc}") from None
    migrate(settings)


if __name__ == "__main__":
    main()
