"""Every command-line entry answers a missing service, database or schema, a PARTITIONS that
disagrees with the deployment's, or a setting it cannot use, with one line saying what to do,
and a non-zero exit."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shared.settings import Settings
from tests.conftest import settings_env, with_database
from tests.metrics import free_port

ROOT = Path(__file__).resolve().parents[1]

ENTRIES = {
    "api": ["api"],
    "worker": ["worker"],
    "status": ["worker", "status"],
    "replay": ["worker", "replay-dead-letters"],
}


# Entries that need RabbitMQ and not PostgreSQL.
BROKER_ONLY = {"dead-letters": ["worker", "dead-letters"]}
# Every entry that reads the settings: the services, the admin commands and the migration.
CONFIGURED = {**ENTRIES, **BROKER_ONLY, "migrate": ["shared.migrate"]}
# Every entry that reads the database, and every one that talks to RabbitMQ.
USES_POSTGRESQL = [*ENTRIES, "migrate"]
USES_RABBITMQ = [*ENTRIES, *BROKER_ONLY]


def run(entry: str, env: dict[str, str], **settings: str) -> subprocess.CompletedProcess[str]:
    """Run the entry without waiting for services (STARTUP_TIMEOUT_S=0), with `settings` (an
    environment variable each) over those."""
    return subprocess.run(
        [sys.executable, "-m", *CONFIGURED[entry]],
        cwd=ROOT,
        env={
            **env,
            "STARTUP_TIMEOUT_S": "0",
            "WORKER_METRICS_PORT": "0",
            "API_PORT": "0",
            **settings,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def the_one_line(result: subprocess.CompletedProcess[str], entry: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"python -m {CONFIGURED[entry][0]}"), lines[0]
    return lines[0]


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


@pytest.mark.parametrize("entry", ENTRIES)
def test_postgresql_unreachable(entry: str, env: dict[str, str], settings: Settings) -> None:
    port = free_port()
    env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{port}/ticketing"

    line = the_one_line(run(entry, env), entry)

    assert f"PostgreSQL is not reachable at 127.0.0.1:{port}" in line
    assert "DATABASE_URL" in line


def test_migrate_with_postgresql_unreachable(env: dict[str, str]) -> None:
    """`make run` migrates first: with PostgreSQL down, that is a newcomer's first message."""
    port = free_port()
    env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{port}/ticketing"

    result = subprocess.run(
        [sys.executable, "-m", "shared.migrate"],
        cwd=ROOT,
        env={**env, "STARTUP_TIMEOUT_S": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("python -m shared.migrate: PostgreSQL is not reachable at "), line
    assert f"127.0.0.1:{port}" in line
    assert "DATABASE_URL" in line


@pytest.mark.parametrize("entry", USES_POSTGRESQL)
def test_postgresql_refuses_the_user(entry: str, env: dict[str, str]) -> None:
    parts = urlsplit(env["DATABASE_URL"])
    host = parts.netloc.rpartition("@")[2]
    env["DATABASE_URL"] = urlunsplit(parts._replace(netloc=f"ticketing_no_such_role@{host}"))
    started = time.monotonic()

    # A refused login is not a server still starting: said at once, not after the wait.
    line = the_one_line(run(entry, env, STARTUP_TIMEOUT_S="20"), entry)

    assert "refused the user or password in DATABASE_URL" in line
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("entry", ENTRIES)
def test_database_missing(entry: str, env: dict[str, str], settings: Settings) -> None:
    env["DATABASE_URL"] = with_database(settings.database_url, "ticketing_never_created")

    line = the_one_line(run(entry, env), entry)

    assert "database 'ticketing_never_created' does not exist" in line
    assert "make migrate" in line


@pytest.mark.parametrize("entry", ENTRIES)
async def test_schema_not_migrated(entry: str, env: dict[str, str], settings: Settings) -> None:
    empty = f"{settings.database_url.rsplit('/', 1)[1]}_empty"
    admin = await asyncpg.connect(with_database(settings.database_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{empty}"')  # our own name: hex and digits
        env["DATABASE_URL"] = with_database(settings.database_url, empty)

        line = the_one_line(run(entry, env), entry)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')
        await admin.close()

    assert "schema is not up to date" in line
    assert "make migrate" in line


@pytest.mark.parametrize("entry", USES_RABBITMQ)
def test_rabbitmq_unreachable(entry: str, env: dict[str, str]) -> None:
    port = free_port()
    env["RABBITMQ_URL"] = f"amqp://guest:guest@127.0.0.1:{port}/"

    line = the_one_line(run(entry, env), entry)

    assert f"RabbitMQ is not reachable at 127.0.0.1:{port}" in line
    assert "RABBITMQ_URL" in line


@pytest.mark.parametrize("entry", USES_RABBITMQ)
def test_rabbitmq_virtual_host_missing(entry: str, env: dict[str, str]) -> None:
    env["RABBITMQ_URL"] = env["RABBITMQ_URL"].rstrip("/") + "/ticketing-no-such-vhost"

    line = the_one_line(run(entry, env), entry)

    assert "refused to open virtual host 'ticketing-no-such-vhost'" in line
    assert "RABBITMQ_URL" in line


@pytest.mark.parametrize("entry", ["api", "worker", "replay", "status"])
async def test_partitions_other_than_the_deployments(
    entry: str, env: dict[str, str], db: asyncpg.Pool, settings: Settings
) -> None:
    await db.execute("INSERT INTO cluster_config (partitions) VALUES ($1)", settings.partitions)
    env["PARTITIONS"] = str(settings.partitions * 2)

    line = the_one_line(run(entry, env), entry)

    assert f"PARTITIONS is {settings.partitions * 2} here" in line
    assert f"runs with PARTITIONS={settings.partitions}" in line


async def test_a_status_before_anything_ran_records_no_partitions(
    env: dict[str, str], db: asyncpg.Pool
) -> None:
    """A status only reads: the first service to start records the deployment's PARTITIONS."""
    env["PARTITIONS"] = "7"

    run("status", env)

    assert await db.fetchval("SELECT count(*) FROM cluster_config") == 0


@pytest.mark.parametrize("entry", ["api", "worker"])
async def test_queues_left_with_other_arguments(
    entry: str, env: dict[str, str], settings: Settings, amqp: object
) -> None:
    """The queues exist (`amqp` declared them) with another QUEUE_MAX_LENGTH than this process
    asks for: one line with the ways out, before anything serves."""
    other = str(settings.queue_max_length + 1)

    line = the_one_line(run(entry, env, QUEUE_MAX_LENGTH=other), entry)

    assert "x-max-length" in line
    assert "BROKER_NAMESPACE" in line


def test_replay_before_anything_declared_the_queues(env: dict[str, str]) -> None:
    line = the_one_line(run("replay", env), "replay")

    assert "queues are not declared on this broker" in line


def no_services() -> dict[str, str]:
    """An environment whose services are nowhere: an entry that read its settings wrong and went
    on could reach nothing, and would say so instead of naming the bad setting."""
    return {
        **os.environ,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/ticketing",
        "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
    }


@pytest.mark.parametrize("entry", CONFIGURED)
def test_a_bad_setting_is_one_line_naming_the_variable_from_every_entry(entry: str) -> None:
    line = the_one_line(run(entry, no_services(), PARTITIONS="0"), entry)

    assert "invalid configuration: PARTITIONS=0: input should be greater than or equal to 1" in line


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("API_PORT", "abc", "API_PORT=abc: input should be a valid integer"),
        ("LOG_LEVEL", "verbose", "LOG_LEVEL=VERBOSE: input should be 'DEBUG', 'INFO'"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT=xml: input should be 'json' or 'text'"),
        ("LEASE_TTL_S", "soon", "LEASE_TTL_S=soon: input should be a valid number"),
        ("PURCHASE_ID_SECRET", "hunter2-short", "PURCHASE_ID_SECRET: string should have at least"),
        ("RABBITMQ_URL", "http://guest:hunter2@rmq:5672/", "RABBITMQ_URL: holds a http URL"),
    ],
)
def test_a_bad_setting_names_the_variable_and_never_echoes_a_secret(
    variable: str, value: str, says: str
) -> None:
    line = the_one_line(run("api", no_services(), **{variable: value}), "api")

    assert says in line
    assert "hunter2" not in line


@pytest.mark.parametrize("entry", ["api", "migrate"])
@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("DATABASE_URL", "ticketing", "DATABASE_URL: is not a postgresql:// URL"),
        ("DATABASE_URL", "postgresql://u:hunter2@db:5432", "DATABASE_URL: names no database"),
        ("DATABASE_URL", "postgresql://u:hunter2@db:54e2/x", "DATABASE_URL: port could not be"),
        ("RABBITMQ_URL", "amqp://u:hunter2@rmq:56720x/", "RABBITMQ_URL: port could not be"),
    ],
)
def test_a_malformed_service_url_is_one_line_naming_the_variable(
    entry: str, variable: str, value: str, says: str
) -> None:
    line = the_one_line(run(entry, no_services(), **{variable: value}), entry)

    assert says in line
    assert "hunter2" not in line


@pytest.mark.parametrize(
    "origins", ["https://shop.example.com/", '["https://shop.example.com"]', "shop.example.com"]
)
def test_a_cors_origin_a_browser_could_never_send_is_one_line(origins: str) -> None:
    # Compared as it is with the browser's Origin (scheme://host[:port]), such an entry would
    # never match: every cross-origin call refused, and nothing said why.
    line = the_one_line(run("api", no_services(), CORS_ORIGINS=origins), "api")

    assert "CORS_ORIGINS" in line
    assert "is not an origin: give * or scheme://host[:port]" in line


def test_cors_origins_take_a_comma_separated_list_of_origins() -> None:
    settings = Settings(cors_origins="https://shop.example.com, http://localhost:3000")
    assert settings.cors_origins == ["https://shop.example.com", "http://localhost:3000"]
    assert Settings(cors_origins="*").cors_origins == ["*"]


@pytest.mark.parametrize("entry", ["api", "worker"])
def test_a_pool_whose_minimum_is_above_its_maximum_is_one_line(entry: str) -> None:
    line = the_one_line(run(entry, no_services(), DB_POOL_MIN="20", DB_POOL_MAX="5"), entry)

    assert "invalid configuration: DB_POOL_MIN (20) is above DB_POOL_MAX (5)" in line


def run_api(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api", *argv],
        cwd=ROOT,
        env={**no_services(), "STARTUP_TIMEOUT_S": "0", "API_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_api_help_says_it_is_configured_by_the_environment_and_starts_nothing() -> None:
    result = run_api("--help")

    assert result.returncode == 0, result
    assert result.stdout.startswith("usage: python -m api"), result.stdout
    assert "environment variables" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("argv", [["--port", "9000"], ["worker"]])
def test_api_refuses_arguments_it_does_not_take(argv: list[str]) -> None:
    result = run_api(*argv)

    assert result.returncode == 2, result
    assert "usage: python -m api" in result.stderr
    assert "unrecognized arguments" in result.stderr


def test_status_piped_into_a_reader_that_stops_early_ends_without_a_traceback(
    env: dict[str, str],
) -> None:
    """`python -m worker status | head -3`: the reader closing the pipe is not an error."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "status"],
        cwd=ROOT,
        env={**env, "STARTUP_TIMEOUT_S": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # gone before the first line, as `head` may be
    _, stderr = proc.communicate(timeout=60)

    assert "Traceback" not in stderr, stderr
    assert "BrokenPipeError" not in stderr, stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_api_on_a_port_another_process_listens_on_is_one_line(
    env: dict[str, str], workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        line = the_one_line(run("api", env, API_PORT=str(port), API_WORKERS=workers), "api")

    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "API_PORT" in line


@pytest.mark.parametrize(
    ("host", "variable"), [("999.1.1.1", "API_HOST"), ("192.0.2.1", "API_HOST")]
)
def test_api_on_an_address_not_of_this_machine_is_one_line(
    env: dict[str, str], host: str, variable: str
) -> None:
    line = the_one_line(run("api", env, API_HOST=host), "api")

    assert host in line
    assert variable in line
