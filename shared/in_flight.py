"""How many messages a partition may have in flight (sent, not yet confirmed) at once.

One in flight is cheapest: while it awaits its confirm, the purchases arriving meanwhile pack into
the next message, so a flood costs one publish and one confirm per many purchases. But a broker
that confirms slowly (a slow disk under a quorum queue) then leaves purchases waiting for a slot
while the CPU sits idle. So the window adapts, on the one signal that tells the two apart: idle
CPU on this machine (smoothed, since it swings from one quarter second to the next). It widens,
one message at a time, while purchases waited for a slot and the machine had CPU to spare; it
halves as soon as the CPU is busy, since then every extra message costs CPU that requests need
(and smaller messages mean more of them).

The same readings tell whether this process itself has CPU to spare (`spare`): its own CPU time
over the interval's, smoothed. A process that is idle for part of each interval waits on
confirms with nothing else to do, and may then send a message as soon as it is full rather than
at the end of the loop's turn (see PurchasePublisher.full_batch). The machine's idle share cannot
tell this: on two cores, a process can use all of its one while the machine is a third idle.
"""

import time
from collections.abc import Callable
from pathlib import Path

# Decisions are taken at most this often, on what the CPU did since the last one.
INTERVAL_S = 0.25
# Idle shares of all the machine's CPUs, smoothed: above WIDEN_IDLE there is CPU to spare for
# more messages; below NARROW_IDLE the CPU is the bottleneck. Measured here: two or three in flight
# beat one for a hot event at 64 connections (idle near 15 % at one), one beats more at 256
# connections, and for many events at once (idle near zero at one).
WIDEN_IDLE = 0.10
NARROW_IDLE = 0.05
SMOOTHING = 0.5  # weight of the newest reading
# This process's busy share (1.0: a whole core), smoothed: below SPARE_BELOW it has CPU to spare;
# it keeps sparing until above SPARE_UNTIL. Measured here: at 64 connections the API is busy 0.84
# sending at turns' ends and 0.92-0.94 sending early, which it keeps doing; at 256 connections it
# is 0.93 sending at turns' ends, and early sends pushed it to 0.95-0.98 for nothing but CPU.
SPARE_BELOW = 0.88
SPARE_UNTIL = 0.955


class CpuIdle:
    """The share of time the machine's CPUs were idle between two readings (/proc/stat); where
    there is no /proc/stat, this process's own CPU share stands in."""

    def __init__(self, stat: Path = Path("/proc/stat")) -> None:
        self._stat = stat
        self._last = self._read()

    def _read(self) -> tuple[float, float]:
        """(idle, total) time so far."""
        try:
            fields = self._stat.read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return time.process_time(), time.monotonic()  # busy, wall: inverted below
        values = [float(v) for v in fields]
        return values[3] + values[4], sum(values)  # idle + iowait, everything

    def share(self) -> float:
        now = self._read()
        idle, total = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        if total <= 0:
            return 1.0
        if not self._stat.exists():
            return max(0.0, 1.0 - idle / total)
        return idle / total


class InFlightWindow:
    def __init__(
        self,
        *,
        maximum: int,
        cpu: CpuIdle | None = None,
        interval_s: float = INTERVAL_S,
        own_cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.maximum = maximum
        self.size = 1
        self.spare = False  # this process has CPU to spare (see the module's docstring)
        self._cpu = cpu if cpu is not None else (CpuIdle() if maximum > 1 else None)
        self._interval_s = interval_s
        self._next = time.monotonic() + interval_s
        self._waited = False
        self._idle: float | None = None
        self._own_cpu = own_cpu
        self._own_read = (own_cpu(), time.monotonic())
        self._busy: float | None = None

    def waited(self) -> None:
        """Purchases are waiting for a free slot."""
        self._waited = True

    def adapt(self) -> int:
        """The current size, revised if an interval has passed."""
        if self._cpu is None:
            return self.size
        now = time.monotonic()
        if now < self._next:
            return self.size
        self._next = now + self._interval_s
        self._read_own(now)
        reading = self._cpu.share()
        idle = reading if self._idle is None else SMOOTHING * reading + (1 - SMOOTHING) * self._idle
        self._idle = idle
        if idle < NARROW_IDLE:
            self.size = max(1, self.size // 2)
        elif self._waited and idle > WIDEN_IDLE:
            self.size = min(self.maximum, self.size + 1)
        self._waited = False
        return self.size

    def _read_own(self, now: float) -> None:
        cpu, (last_cpu, last) = self._own_cpu(), self._own_read
        self._own_read = (cpu, now)
        if now <= last:
            return
        reading = (cpu - last_cpu) / (now - last)
        busy = reading if self._busy is None else SMOOTHING * reading + (1 - SMOOTHING) * self._busy
        self._busy = busy
        if busy < SPARE_BELOW:
            self.spare = True
        elif busy > SPARE_UNTIL:
            self.spare = False
