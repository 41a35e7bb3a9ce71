"""Settings every API and worker process of a deployment must share, recorded in PostgreSQL by
the first process that starts.

PARTITIONS decides which queue carries an event's purchases (crc32 of its id modulo PARTITIONS).
A process started with another value would send, or consume, one event's purchases through a
second queue and a second writer, so it refuses to start instead.
"""

from shared.db import Connection
from shared.errors import StartupError

RECORD_PARTITIONS = """
    INSERT INTO cluster_config (partitions) VALUES ($1)
    ON CONFLICT (singleton) DO NOTHING
"""

RECORDED_PARTITIONS = "SELECT partitions, recorded_at FROM cluster_config"


class PartitionsMismatch(StartupError):
    """This process's PARTITIONS differs from the one the deployment was started with."""


async def agree_on_partitions(conn: Connection, partitions: int, *, record: bool = True) -> None:
    """Record `partitions` if nothing is recorded yet (unless not to `record`: a read-only
    command); raise PartitionsMismatch if another value is."""
    if record:
        await conn.execute(RECORD_PARTITIONS, partitions)
    row = await conn.fetchrow(RECORDED_PARTITIONS)
    if row is None:  # nothing recorded, and not asked to
        return
    if row["partitions"] != partitions:
        raise PartitionsMismatch(
            f"PARTITIONS is {partitions} here, but this deployment runs with PARTITIONS="
            f"{row['partitions']} (recorded {row['recorded_at']:%Y-%m-%d %H:%M} UTC): set "
            f"PARTITIONS={row['partitions']}, or see README, 'Changing PARTITIONS'."
        )
