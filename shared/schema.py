"""Where the schema comes from: the database DATABASE_URL names and the SQL migrations this code
expects. Kept apart from `shared.migrate` so that the services' start-up check does not load the
migration tool and its driver (psycopg, yoyo: about 10 MB in every API and worker process)."""

from pathlib import Path
from urllib.parse import urlsplit

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def database_name(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    if not name:
        raise ValueError(f"DATABASE_URL names no database: {url!r}")
    return name


def expected_migrations(directory: Path = MIGRATIONS_DIR) -> set[str]:
    return {
        path.name.removesuffix(".sql")
        for path in directory.glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    }
