"""Each test's own database: a clone of the migrated template, or a recycled one.

A clone (CREATE DATABASE ... TEMPLATE) writes the whole template, system catalogs included,
through the WAL and flushes it: about 0.1 s on a fast disk, over half a second on a slow one,
for each of several hundred tests. So the database of a finished test is recycled when it is
provably what the template is but for its rows:
- nobody is connected to it any more (a process a test left behind could write into the next
  test's data);
- its catalog has the template's fingerprint: the same relations, columns, defaults,
  constraints, indexes, triggers, routines, schemas, types, extensions, settings and migrations
  record (a test that created a table or re-ran a migration fails this);
- then its tables are truncated.
Anything else, and it is dropped, as every database used to be. Every database of the run is
dropped when the run ends.
"""

import asyncio

import asyncpg

from shared.migrate import drop_database

# Every line a database's schema is made of, hashed; the template's and a used database's must
# be equal for that database to be recycled.
FINGERPRINT = """
SELECT md5(string_agg(line, E'\\n' ORDER BY line)) FROM (
    SELECT format('relation %s %s', c.oid::regclass, c.relkind) AS line
      FROM pg_class c
     WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace,
                                  'pg_toast'::regnamespace)
    UNION ALL
    SELECT format('column %s.%s %s %s %s', a.attrelid::regclass, a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  pg_get_expr(d.adbin, d.adrelid))
      FROM pg_attribute a
      JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
      FROM pg_constraint
     WHERE connamespace = 'public'::regnamespace
    UNION ALL
    SELECT format('index %s', pg_get_indexdef(indexrelid))
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
     WHERE c.relnamespace = 'public'::regnamespace
    UNION ALL
    SELECT format('trigger %s', pg_get_triggerdef(oid)) FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL
    SELECT format('routine %s %s', oid::regprocedure, md5(prosrc))
      FROM pg_proc
     WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
    UNION ALL
    SELECT format('namespace %s', nspname) FROM pg_namespace
    UNION ALL
    SELECT format('type %s', oid::regtype) FROM pg_type WHERE typnamespace = 'public'::regnamespace
    UNION ALL
    SELECT format('extension %s %s', extname, extversion) FROM pg_extension
    UNION ALL
    SELECT format('setting %s', setconfig)
      FROM pg_db_role_setting
     WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
    UNION ALL
    SELECT format('migration %s %s', migration_id, applied_at_utc) FROM _yoyo_migration
    UNION ALL
    SELECT format('migration log %s', count(*)) FROM _yoyo_log
    UNION ALL
    SELECT format('lock %s', count(*)) FROM yoyo_lock
) AS schema
"""

# The tables whose rows tests make (the migrations record is the template's: fingerprinted).
TABLES = """
SELECT string_agg(format('%I', tablename), ', ' ORDER BY tablename)
  FROM pg_tables
 WHERE schemaname = 'public' AND tablename !~ 'yoyo'
"""

# How long the connections of a finished test may take to close before its database is dropped
# rather than recycled (a pool's connections are gone a few milliseconds after it closes).
CLOSE_WAIT_S = 0.5


class TestDatabases:
    """Hands out this run's test databases and takes them back."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, server_url: str, template: str) -> None:
        self._server_url = _server_url(server_url)
        self._template = template
        self._fingerprint: str | None = None
        self._free: list[str] = []
        self._made: set[str] = set()
        self.recycled = 0

    def _url(self, name: str) -> str:
        return _database_url(self._server_url, name)

    async def acquire(self, name: str) -> str:
        """A database as the template is: a recycled one, else `name`, cloned."""
        if self._free:
            self.recycled += 1
            return self._free.pop()
        await clone(self._url(self._template), self._template, name)
        self._made.add(name)
        return name

    async def release(self, name: str) -> None:
        """Take back a finished test's database: recycled if it provably can be, else dropped."""
        if await self._reusable(name):
            self._free.append(name)
        else:
            self._made.discard(name)
            drop_database(self._url(name))

    async def _reusable(self, name: str) -> bool:
        if not await self._unused(name):
            return False
        if self._fingerprint is None:
            self._fingerprint = await _fetch(self._url(self._template), FINGERPRINT)
        conn = await asyncpg.connect(self._url(name))
        try:
            if await conn.fetchval(FINGERPRINT) != self._fingerprint:
                return False
            await conn.execute(f"TRUNCATE {await conn.fetchval(TABLES)}")
        finally:
            await conn.close()
        return True

    async def _unused(self, name: str) -> bool:
        admin = await asyncpg.connect(self._url("postgres"))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + CLOSE_WAIT_S
            while await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name
            ):
                if loop.time() > deadline:
                    return False
                await asyncio.sleep(0.01)
        finally:
            await admin.close()
        return True

    def drop_all(self) -> None:
        for name in self._made:
            drop_database(self._url(name))
        self._made.clear()
        self._free.clear()


async def clone(url: str, template: str, name: str) -> None:
    """Create database `name` as a copy of `template`, on the server of `url` (a URL of any
    database there)."""
    admin = await asyncpg.connect(_database_url(_server_url(url), "postgres"))
    try:
        # Names are ours (hex, digits and fixed tags); identifiers cannot be bound as parameters.
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()


def _server_url(url: str) -> str:
    """A database URL without its database name."""
    return url.rsplit("/", 1)[0]


def _database_url(server_url: str, name: str) -> str:
    return f"{server_url}/{name}"


async def _fetch(url: str, query: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        value: str = await conn.fetchval(query)
        return value
    finally:
        await conn.close()
