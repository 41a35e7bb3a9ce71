"""Real PostgreSQL and RabbitMQ for every test.

Local services are used when reachable (DATABASE_URL / RABBITMQ_URL, with the usual local
defaults); otherwise testcontainers starts them where Docker exists. Each test gets its own
database (a clone of a migrated template, or one a finished test left as the template is but for
its rows: tests/databases.py) and its own broker namespace; everything is removed afterwards.
"""

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx
import pytest
import pytest_asyncio

from api.main import create_app
from shared import broker, broker_nodes
from shared.migrate import apply_migrations, create_database_if_missing, drop_database
from shared.settings import Settings
from tests.broker_cluster import EARLY_START
from tests.databases import TestDatabases
from worker.supervisor import Worker

RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count(1)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/ticketing"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


# The module whose tests need the three-node broker cluster (tests/broker_cluster.py).
CLUSTER_TESTS = "tests/faults/test_broker_cluster.py"


def _in_xdist_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test must have an id of its own: pytest-xdist hands tests out by id, and runs a
    test sharing one only once, silently. Under pytest-xdist (`make test`), the cluster tests'
    file goes first, then the files holding slow tests, each file's tests in their order: the
    process the cluster tests go to boots the cluster while the others run the rest, and the
    longest files are not left for the end. (Every process orders alike, as xdist requires.)"""
    shared = [nodeid for nodeid, n in Counter(item.nodeid for item in items).items() if n > 1]
    if shared:
        raise pytest.UsageError(f"tests sharing an id (pytest-xdist would run each once): {shared}")
    if _in_xdist_worker():
        slow_files = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(
            key=lambda item: (
                not item.nodeid.startswith(CLUSTER_TESTS),
                item.path not in slow_files,
            )
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    """In a run of one process, when the run holds the cluster tests, start their cluster now,
    while the tests before them run, rather than when they come. (Under pytest-xdist every
    process collects every test, but only one runs the cluster tests: it starts the cluster.)"""
    if session.config.option.collectonly or _in_xdist_worker():
        return
    if any(item.nodeid.startswith(CLUSTER_TESTS) for item in session.items):
        EARLY_START.begin()


def pytest_sessionfinish(session: pytest.Session) -> None:
    EARLY_START.abandon()


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped by SIGTERM (a CI job's timeout, `timeout`, a supervisor) cleans up as one
    stopped by Ctrl-C: Python's default for SIGTERM ends the process at once, leaving this run's
    databases, queues and exchanges behind on the shared servers."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    # As a SIGINT, so that a test running on the event loop is cancelled as by Ctrl-C (asyncio's
    # runner takes SIGINT over) and every fixture's teardown still runs.
    os.kill(os.getpid(), signal.SIGINT)


@dataclass(frozen=True)
class Services:
    database_url: str  # any database on the server; tests swap the name
    rabbitmq_url: str


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    database_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    rabbitmq_url = os.environ.get("RABBITMQ_URL", DEFAULT_RABBITMQ_URL)
    if _reachable(database_url, 5432) and _reachable(rabbitmq_url, 5672):
        yield Services(database_url, rabbitmq_url)
        return
    if not _docker_available():
        pytest.exit(
            f"PostgreSQL ({database_url}) or RabbitMQ ({rabbitmq_url}) is not reachable and there "
            "is no Docker for testcontainers: start them (see README) or set DATABASE_URL and "
            "RABBITMQ_URL.",
            returncode=3,
        )
    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    with (
        PostgresContainer("postgres:15", driver=None) as pg,
        RabbitMqContainer("rabbitmq:3.10-management") as mq,
    ):
        amqp = f"amqp://guest:guest@{mq.get_container_host_ip()}:{mq.get_exposed_port(5672)}/"
        yield Services(pg.get_connection_url(), amqp)


@pytest.fixture(scope="session")
def template_database(services: Services) -> Iterator[str]:
    """A migrated database that each test's database is cloned from (fast, and proves the
    migrations build the schema)."""
    url = with_database(services.database_url, f"ticketing_test_{RUN_ID}_template")
    create_database_if_missing(url)
    apply_migrations(url)
    yield urlsplit(url).path.lstrip("/")
    drop_database(url)


@pytest.fixture(scope="session")
def databases(services: Services, template_database: str) -> Iterator[TestDatabases]:
    """Each test's database: cloned from the template, or recycled (tests/databases.py)."""
    pool = TestDatabases(services.database_url, template_database)
    yield pool
    pool.drop_all()


def make_settings(
    services: Services, database: str, namespace: str, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "database_url": with_database(services.database_url, database),
        "rabbitmq_url": services.rabbitmq_url,
        "broker_namespace": namespace,
        "partitions": 4,
        "lease_ttl_s": 3.0,
        "batch_max_wait_ms": 5,
        "event_cache_ttl_s": 0.0,
        "purchase_id_secret": "test-secret-" + RUN_ID,
        "worker_id": "test-worker",
        "delivery_limit": 20,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def settings(
    services: Services, databases: TestDatabases, request: pytest.FixtureRequest
) -> AsyncIterator[Settings]:
    number = next(_counter)
    database = await databases.acquire(f"ticketing_test_{RUN_ID}_{number}")
    overrides = getattr(request, "param", {})
    settings = make_settings(services, database, f"test.{RUN_ID}.{number}", **overrides)
    yield settings
    await delete_topology(settings)
    await databases.release(database)


async def delete_topology(settings: Settings) -> None:
    connection = await broker_nodes.connect(settings)
    try:
        channel = await connection.channel()
        await broker.delete_topology(channel, broker.Topology.from_settings(settings))
    finally:
        await connection.close()


@pytest_asyncio.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=5)
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def amqp(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain channel on the test's broker, with the topology declared."""
    connection = await broker_nodes.connect(settings)
    await broker.declare_topology(connection, broker.Topology.from_settings(settings))
    yield await connection.channel()
    await connection.close()


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@pytest_asyncio.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as client:
        yield client


StartWorker = Callable[..., Awaitable[Worker]]


@pytest_asyncio.fixture
async def start_worker(settings: Settings) -> AsyncIterator[StartWorker]:
    """Start in-process workers (each its own asyncio task); all are stopped at teardown."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(worker_id: str | None = None, **overrides: object) -> Worker:
        worker_id = worker_id or f"worker-{len(running) + 1}"
        worker = Worker(settings.model_copy(update={"worker_id": worker_id, **overrides}))
        running.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, _ in running:
        worker.stop()
    for _, task in running:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a `python -m worker` / `python -m api` subprocess needs for `settings`."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env
