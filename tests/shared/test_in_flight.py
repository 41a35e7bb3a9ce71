"""The in-flight window: one message while the CPU is busy, wider only while purchases wait for
a slot and the machine has CPU to spare."""

from pathlib import Path

import pytest

from shared.in_flight import NARROW_IDLE, WIDEN_IDLE, CpuIdle, InFlightWindow

IDLE = min(1.0, WIDEN_IDLE * 3)
BUSY = NARROW_IDLE / 2
BETWEEN = (NARROW_IDLE + WIDEN_IDLE) / 2


class Idle(CpuIdle):
    """Idle shares read from a script instead of /proc/stat."""

    def __init__(self, shares: list[float]) -> None:
        self._shares = iter(shares)

    def share(self) -> float:
        return next(self._shares)


def window(shares: list[float], maximum: int = 4) -> InFlightWindow:
    return InFlightWindow(maximum=maximum, cpu=Idle(shares), interval_s=0.0)


def test_it_starts_at_one_and_widens_while_purchases_wait_and_the_cpu_idles() -> None:
    w = window([IDLE] * 10)
    assert w.size == 1
    sizes = []
    for _ in range(5):
        w.waited()
        sizes.append(w.adapt())
    assert sizes == [2, 3, 4, 4, 4]


def test_it_does_not_widen_when_nothing_waited_for_a_slot() -> None:
    w = window([IDLE] * 3)
    assert [w.adapt() for _ in range(3)] == [1, 1, 1]


def test_a_busy_cpu_halves_it_down_to_one_even_while_purchases_wait() -> None:
    # Smoothed idle after three idle readings then zeros: 0.3, 0.3, 0.3, 0.15, 0.075, 0.0375, ...
    w = window([IDLE, IDLE, IDLE, 0.0, 0.0, 0.0, 0.0, 0.0])
    sizes = []
    for _ in range(8):
        w.waited()
        sizes.append(w.adapt())
    assert sizes == [2, 3, 4, 4, 4, 2, 1, 1]


def test_one_busy_reading_does_not_narrow_it() -> None:
    """The idle share swings from one quarter second to the next; one dip is smoothed over."""
    w = window([IDLE, IDLE, 0.0, IDLE])
    sizes = []
    for _ in range(4):
        w.waited()
        sizes.append(w.adapt())
    assert sizes == [2, 3, 4, 4]


def test_between_the_thresholds_it_holds_its_size() -> None:
    # Smoothed: 0.3 (widen), 0.15 (widen), 0.075 and 0.075 (between: hold).
    w = window([IDLE, 0.0, 0.0, BETWEEN])
    sizes = []
    for _ in range(4):
        w.waited()
        sizes.append(w.adapt())
    assert sizes == [2, 3, 3, 3]


def test_between_the_thresholds_it_never_widens() -> None:
    w = window([BETWEEN] * 4)
    sizes = []
    for _ in range(4):
        w.waited()
        sizes.append(w.adapt())
    assert sizes == [1, 1, 1, 1]


def test_a_maximum_of_one_never_widens_nor_reads_the_cpu() -> None:
    w = InFlightWindow(maximum=1)
    w.waited()
    assert w.adapt() == 1


def test_cpu_idle_reads_the_share_of_idle_time_between_readings(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n")
    idle = CpuIdle(stat)
    stat.write_text("cpu  150 0 150 750 150 0 0 0 0 0\n")  # +200 ticks, 100 of them idle/iowait
    assert idle.share() == 0.5


class Clock:
    """This process's CPU time, advanced by hand."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_spare_while_this_process_idles_part_of_each_interval_until_it_is_nearly_always_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process's own busy share, smoothed, decides `spare`: on below SPARE_BELOW, off only
    above SPARE_UNTIL (between the two it holds), whatever the machine's idle share."""
    wall = [0.0]
    monkeypatch.setattr("shared.in_flight.time.monotonic", lambda: wall[0])
    own = Clock()
    w = InFlightWindow(maximum=4, cpu=Idle([IDLE] * 20), interval_s=0.0, own_cpu=own)
    seen = []
    for busy in (0.99, 0.99, 0.80, 0.80, 0.95, 0.95, 0.95, 1.0, 1.0, 1.0):
        wall[0] += 1.0
        own.seconds += busy
        w.adapt()
        seen.append(w.spare)
    assert seen == [False, False, False, True, True, True, True, False, False, False]


def test_a_maximum_of_one_never_spares() -> None:
    own = Clock()
    w = InFlightWindow(maximum=1, own_cpu=own, interval_s=0.0)
    for _ in range(3):
        w.adapt()
    assert not w.spare
