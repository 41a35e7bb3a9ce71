"""CPU time of the processes a scenario runs on, read from /proc.

Each group (the API, the workers, RabbitMQ, PostgreSQL) is a set of root processes and their
descendants. A group's CPU time is what its live processes spent (user + system) plus what their
reaped children spent (`cutime`, `cstime`), so a PostgreSQL backend or a uvicorn worker that
exits mid-run still counts. Deltas of two snapshots give the CPU a scenario cost.
"""

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in children.read_text().split()]
        except OSError:
            continue
    return found


def tree(root: int) -> list[int]:
    """`root` and every live descendant."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        queue += _children(pid)
    return pids


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system time of the trees under `roots`, with their reaped children's."""
    total = 0.0
    for root in roots:
        for pid in tree(root):
            fields = _stat(pid)
            if fields is None:
                continue
            # Fields 14..17 of /proc/pid/stat (1-based): utime, stime, cutime, cstime.
            utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
            total += (utime + stime + cutime + cstime) * TICK_S
    return total


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


SYSTEM_RABBITMQ_PID_FILE = Path("/var/lib/rabbitmq/mnesia/rabbit@localhost.pid")


def rabbitmq_nodes(pid_files: Iterable[Path] = (SYSTEM_RABBITMQ_PID_FILE,)) -> list[int]:
    """The Erlang VMs of the RabbitMQ nodes whose pid files are given (the machine's node by
    default): a node's command line does not name it."""
    pids = []
    for pid_file in pid_files:
        try:
            pids.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def postgres_postmasters() -> list[int]:
    """Each PostgreSQL server's postmaster: backends are its children, reaped ones included."""
    roots = []
    for pid in _pids():
        fields = _stat(pid)
        if fields is None or not _cmdline(pid).startswith("/usr/lib/postgresql/"):
            continue
        parent = int(fields[1])
        if not _cmdline(parent).startswith("/usr/lib/postgresql/"):
            roots.append(pid)
    return roots


@dataclass
class CpuMeter:
    """CPU seconds per group between `start()` and `stop()`."""

    groups: dict[str, Callable[[], list[int]]]

    def __post_init__(self) -> None:
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: cpu_seconds(roots()) for name, roots in self.groups.items()}

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        end = self._read()
        return {name: end[name] - self._start.get(name, 0.0) for name in end}
