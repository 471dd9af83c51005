"""Waiting for observable events instead of sleeping, and an injectable monotonic clock."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], object], timeout: float = 15.0,
             interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def stays(predicate: Callable[[], object], duration: float, interval: float = 0.02) -> bool:
    """True if ``predicate`` holds throughout ``duration`` seconds (to show that nothing
    happens, e.g. no retry in a hot loop; the only bounded wait a negative needs)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())


class ManualClock:
    """A stand-in for the ``time`` module of one module under test: ``monotonic()`` stands
    still until the test calls :meth:`advance`; everything else is the real ``time``."""

    def __init__(self) -> None:
        self._real = time
        self.now = time.monotonic()

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(self._real, name)


class SimulatedTime(ManualClock):
    """A ``time`` stand-in on which sleeping takes no real time: ``sleep(d)`` moves the
    clock by ``d``, ``time()`` is the simulated clock on the Unix epoch. For code whose
    timing (not the machine's speed) is under test."""

    EPOCH = 1_767_225_600.0

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def time(self) -> float:
        return self.EPOCH + self.now
