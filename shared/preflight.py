"""Start-up checks that every entry point runs first.

A newcomer's first run, an operator's typo or a deploy racing its migration should read as one
line that says what to do (start PostgreSQL, run `make migrate`, fix RABBITMQ_URL), not as a
driver's traceback. Each check raises StartupError with that line; the `__main__` modules print
it and exit non-zero.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractConnection

from shared import broker
from shared.cluster_config import agree_on_partitions
from shared.errors import StartupError
from shared.schema import database_name, expected_migrations
from shared.settings import Settings
from shared.urls import host_port, vhost, where

log = logging.getLogger(__name__)

APPLIED_MIGRATIONS = "SELECT migration_id FROM _yoyo_migration"

# "Not there (yet)", as opposed to "there, but says no".
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    aiormq.exceptions.AMQPConnectionError,
)

T = TypeVar("T")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


async def until_reachable(
    connect: Callable[[], Awaitable[T]], *, service: str, where: str, setting: str, wait_s: float
) -> T:
    """`connect()`, retried for up to `wait_s` while the server is not there (yet)."""
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        try:
            return await connect()
        except UNREACHABLE as exc:
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"{service} is not reachable at {where} ({_reason(exc)}): start it, or set "
                    f"{setting} to where it runs."
                ) from None
            if not warned:
                log.warning("waiting up to %.0f s for %s at %s", wait_s, service, where)
                warned = True
            await asyncio.sleep(0.5)


async def connect_database(settings: Settings, *, wait_s: float) -> asyncpg.Connection:
    """A connection to DATABASE_URL, waiting up to `wait_s` for a server that is not up yet."""
    address = where(settings.database_url)

    async def connect() -> asyncpg.Connection:
        try:
            connection: asyncpg.Connection = await asyncpg.connect(settings.database_url, timeout=5)
        except asyncpg.InvalidCatalogNameError:
            name = database_name(settings.database_url)
            raise StartupError(
                f"database {name!r} does not exist on PostgreSQL at {address}: run `make migrate` "
                "(python -m shared.migrate), which creates it."
            ) from None
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
            raise StartupError(
                f"PostgreSQL at {address} refused the user or password in DATABASE_URL."
            ) from None
        return connection

    return await until_reachable(
        connect, service="PostgreSQL", where=address, setting="DATABASE_URL", wait_s=wait_s
    )


async def check_schema(connection: asyncpg.Connection) -> None:
    """The database has every migration this code expects."""
    try:
        applied = {row["migration_id"] for row in await connection.fetch(APPLIED_MIGRATIONS)}
    except asyncpg.UndefinedTableError:
        applied = set()
    pending = sorted(expected_migrations() - applied)
    if pending:
        raise StartupError(
            f"the database schema is not up to date ({len(pending)} migration(s) not applied, "
            f"from {pending[0]}): run `make migrate` (python -m shared.migrate)."
        )


async def check_database(
    settings: Settings, *, wait_s: float, record_partitions: bool = True
) -> None:
    """PostgreSQL answers, the database exists and is migrated, and this process's PARTITIONS
    is the one the deployment was started with (recorded now if it is the first: unless not to
    `record_partitions`, for a command that only reads)."""
    connection = await connect_database(settings, wait_s=wait_s)
    try:
        await check_schema(connection)
        await agree_on_partitions(connection, settings.partitions, record=record_partitions)
    finally:
        await connection.close()


async def check_broker(settings: Settings, *, wait_s: float, declare: bool = False) -> None:
    """RabbitMQ (one node of RABBITMQ_URL at least) accepts a connection with its
    credentials; and, if asked to `declare`, takes the queues and exchanges as these settings
    declare them (TopologyMismatch if one exists with other arguments)."""
    urls = settings.rabbitmq_urls
    addresses = ", ".join(where(url) for url in urls)

    async def connect_one(url: str) -> AbstractConnection:
        # A plain TCP probe first: the AMQP client logs an error of its own for every refused
        # connection, on top of the one line this check is about.
        _, writer = await asyncio.wait_for(asyncio.open_connection(*host_port(url)), 5)
        writer.close()
        try:
            return await aio_pika.connect(url, timeout=5)
        except aiormq.exceptions.ProbableAuthenticationError:
            raise StartupError(
                f"RabbitMQ at {where(url)} refused the user or password in RABBITMQ_URL."
            ) from None
        except aiormq.exceptions.AMQPConnectionError:
            raise  # not there (yet): waited for, then said so
        except aiormq.exceptions.AMQPError:
            # Logged in, then answered Connection.Open with a Connection.Close: the virtual
            # host is missing, or the user may not use it.
            raise StartupError(
                f"RabbitMQ at {where(url)} refused to open virtual host {vhost(url)!r}: it "
                "does not exist, or the user in RABBITMQ_URL may not use it; fix RABBITMQ_URL."
            ) from None

    async def connect() -> AbstractConnection:
        for url in urls[:-1]:
            try:
                return await connect_one(url)
            except UNREACHABLE:
                continue  # another node may answer
        return await connect_one(urls[-1])

    connection = await until_reachable(
        connect, service="RabbitMQ", where=addresses, setting="RABBITMQ_URL", wait_s=wait_s
    )
    try:
        if declare:
            await broker.declare_topology(connection, broker.Topology.from_settings(settings))
    except broker.TopologyMismatch:
        raise
    except Exception as exc:
        # A node going away mid-declaration (a rolling restart), a quorum queue it cannot place
        # yet (a cluster still forming): not the settings' fault. The service declares the
        # queues again as it connects, retrying, as it always has.
        log.warning("declaring the queues failed for now (%s); going on", _reason(exc))
    finally:
        with contextlib.suppress(Exception):  # the connection may be the thing that broke
            await connection.close()


async def check_services(settings: Settings) -> None:
    """Everything `python -m api` and `python -m worker` need before they start. The queues
    are declared here too: a queue left with other arguments (another QUEUE_MAX_LENGTH, say)
    is then one line before the server starts, not a traceback from each process's start-up."""
    await check_database(settings, wait_s=settings.startup_timeout_s)
    await check_broker(settings, wait_s=settings.startup_timeout_s, declare=True)
