"""A lean HTTP/1.1 load generator on asyncio (+ uvloop): keep-alive connections, no parsing
beyond the status line and Content-Length, so it spends little of the CPU it shares with what it
measures. It reports its own CPU time, so that share can be stated next to every figure.
"""

import asyncio
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

RequestFactory = Callable[[int], tuple[str, str, bytes]]  # i -> (method, path, body)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    cpu_seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def cpu_share(self) -> float:
        """The load generator's CPU time over wall time (1.0 = one full core)."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


async def run_load(
    base_url: str,
    make_request: RequestFactory,
    *,
    total: int | None = None,
    duration_s: float | None = None,
    concurrency: int = 64,
    keep_bodies: bool = False,
) -> LoadResult:
    """Send requests over `concurrency` keep-alive connections until `total` were sent or
    `duration_s` passed (both bounded: this never runs unbounded)."""
    if total is None and duration_s is None:
        raise ValueError("give total or duration_s")
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    host_header = f"{host}:{port}".encode()
    counter = iter(range(total if total is not None else 10**12))
    deadline = time.monotonic() + duration_s if duration_s is not None else float("inf")
    result = LoadResult(requests=0, seconds=0.0, cpu_seconds=0.0)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in counter:
                if time.monotonic() >= deadline:
                    return
                method, path, body = make_request(i)
                head = (
                    f"{method} {path} HTTP/1.1\r\nHost: ".encode()
                    + host_header
                    + b"\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                )
                started = time.perf_counter()
                writer.write(head + body)
                try:
                    status, response = await _read_response(reader)
                except (ConnectionError, asyncio.IncompleteReadError):
                    result.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.statuses[status] += 1
                result.requests += 1
                if keep_bodies:
                    result.bodies.append(response)
        finally:
            writer.close()

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    return result
