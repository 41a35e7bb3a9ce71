"""`make migrate` (python -m shared.migrate): creates the database, applies the SQL migrations in
order, records them, and is safe to re-run and to run twice at once."""

import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from shared.migrate import drop_database
from shared.schema import MIGRATIONS_DIR, expected_migrations
from tests.conftest import Services, make_settings, settings_env, with_database


@pytest.fixture
def fresh_database_url(services: Services) -> Iterator[str]:
    url = with_database(services.database_url, f"ticketing_test_migrate_{uuid.uuid4().hex[:8]}")
    yield url
    drop_database(url)


def migrate(url: str, services: Services) -> subprocess.Popen[str]:
    settings = make_settings(services, url.rsplit("/", 1)[1], "unused")
    return subprocess.Popen(
        [sys.executable, "-m", "shared.migrate"],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def applied(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT migration_id FROM _yoyo_migration ORDER BY applied_at_utc")
        return [row[0] for row in rows]


def test_migrate_creates_the_database_and_applies_every_migration_in_order(
    fresh_database_url: str, services: Services
) -> None:
    proc = migrate(fresh_database_url, services)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    expected = sorted(
        path.name.removesuffix(".sql")
        for path in MIGRATIONS_DIR.glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    )
    assert applied(fresh_database_url) == expected
    with psycopg.connect(fresh_database_url) as conn:
        tables = {
            row[0]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {"events", "purchases", "workers", "partition_leases"} <= tables


def test_migrate_takes_a_postgres_scheme_url_as_the_services_do(
    fresh_database_url: str, services: Services
) -> None:
    # postgres:// is what many hosted databases hand out; libpq and asyncpg read it as
    # postgresql://, so the services run with it and the migration must too.
    settings = make_settings(services, fresh_database_url.rsplit("/", 1)[1], "unused")
    env = settings_env(settings)
    env["DATABASE_URL"] = fresh_database_url.replace("postgresql://", "postgres://", 1)
    assert env["DATABASE_URL"].startswith("postgres://")

    result = subprocess.run(
        [sys.executable, "-m", "shared.migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert set(applied(fresh_database_url)) == expected_migrations()


def test_migrate_again_is_a_no_op(fresh_database_url: str, services: Services) -> None:
    for _ in range(2):
        proc = migrate(fresh_database_url, services)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
    assert "migrations applied: 0" in output
    assert len(applied(fresh_database_url)) == len(set(applied(fresh_database_url)))


def test_two_migrations_at_once_apply_each_migration_once(
    fresh_database_url: str, services: Services
) -> None:
    procs = [migrate(fresh_database_url, services) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    migrations = applied(fresh_database_url)
    assert migrations
    assert len(migrations) == len(set(migrations))


def test_the_services_do_not_load_the_migration_tool() -> None:
    """psycopg and yoyo are `make migrate`'s: loaded by the API or a worker, they would cost each
    process about 10 MB for nothing."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, api.__main__, api.main, worker.__main__; "
            "print(sorted(name for name in ('psycopg', 'yoyo') if name in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"
