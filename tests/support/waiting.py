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
