"""Every retry policy in one place: start-up waits and transient faults, nothing else."""

import logging
from collections.abc import Callable

import asyncpg
from aio_pika.exceptions import AMQPConnectionError
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger(__name__)

# Errors that say "the server is not there (yet)", as opposed to "your request is wrong".
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # 55000 at connect: the database is not accepting connections (ALTER DATABASE ...
    # ALLOW_CONNECTIONS false while it is maintained, or being dropped or copied). Its
    # subclasses come along (55P02/3/4, 55006): none is raised by a statement of ours.
    asyncpg.ObjectNotInPrerequisiteStateError,
)
BROKER_UNAVAILABLE: tuple[type[BaseException], ...] = (OSError, AMQPConnectionError)


def wait_for_service(
    what: str, errors: tuple[type[BaseException], ...], timeout_s: float
) -> AsyncRetrying:
    """Retry a connect at start-up, so a service that boots a little later is simply waited for."""
    return AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_exponential(multiplier=0.2, max=3),
        stop=stop_after_delay(timeout_s),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )


# Worth retrying the same transaction for: the server went away, the transaction lost a race, or
# the server says "not now" rather than "not this": a standby refusing writes while a failover
# promotes another (25006), a full disk or memory (53), a cancelled statement or a lock timeout
# (57014, 55P03), an I/O error (58). The worker holds its messages while it retries; failing them
# instead returns them to the queue, where each return counts towards their delivery limit.
TRANSIENT_DATABASE: tuple[type[BaseException], ...] = (
    *DATABASE_UNAVAILABLE,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    asyncpg.PostgresSystemError,
)


def until_stopped(
    errors: tuple[type[BaseException], ...], should_stop: Callable[[], bool]
) -> AsyncRetrying:
    """Retry with backoff (capped at 5 s) for as long as the caller still wants the result.

    The worker holds its messages unacked meanwhile: a database outage delays purchases, it
    never drops them.
    """
    return AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_exponential(multiplier=0.05, max=5),
        stop=lambda _state: should_stop(),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
