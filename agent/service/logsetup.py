"""Logging for a service: journald-friendly under systemd, VIN masking, a rate limit per message.

Under systemd (``JOURNAL_STREAM`` set) lines carry a syslog priority prefix (``<3>``...``<7>``)
and no timestamp of their own: the journal adds both. Elsewhere lines start with a UTC time.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # One journal entry per line: continuation lines get the same priority.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def mask_vin(vehicle_id: str) -> str:
    """Keep the last 4 characters (enough to tell cars apart in a fleet log), mask the rest."""
    keep = 4 if len(vehicle_id) > 6 else 1
    return "*" * (len(vehicle_id) - keep) + vehicle_id[-keep:]


class VinMaskFilter(logging.Filter):
    """Replaces the vehicle id in every formatted message by its masked form."""

    def __init__(self, vehicle_id: str) -> None:
        super().__init__()
        self.vehicle_id = vehicle_id
        self.masked = mask_vin(vehicle_id)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.vehicle_id in message:
            record.msg = message.replace(self.vehicle_id, self.masked)
            record.args = None
        return True


class RateLimitFilter(logging.Filter):
    """At most ``burst`` records per message template per ``window_s``; then one summary.

    Protects the journal (and flash storage) from a flood: a broken bus or a hostile peer
    must not turn into thousands of log lines per second.
    """

    def __init__(self, burst: int = 20, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, object], list] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            if entry is not None and entry[2]:
                record.msg = f"{record.msg} [{entry[2]} similar message(s) suppressed]"
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            return True
        entry[1] += 1
        if entry[1] <= self.burst:
            return True
        entry[2] += 1
        self.suppressed += 1
        return False


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


#: The active rate limiter (its ``suppressed`` count goes into the daemon's metrics).
rate_limit: RateLimitFilter | None = None


def configure(level: str = "info", debug: bool = False, vehicle_id: str | None = None,
              mask: bool = False, burst: int = 20, window_s: float = 60.0,
              stream=None) -> None:
    """(Re)configure the root logger's single stderr handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if under_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    global rate_limit
    rate_limit = RateLimitFilter(burst, window_s)
    handler.addFilter(rate_limit)
    if mask and vehicle_id:
        handler.addFilter(VinMaskFilter(vehicle_id))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else getattr(logging, level.upper(), logging.INFO))
    # python-can tells "Created a socket" at INFO for every bus; ours say what matters.
    logging.getLogger("can").setLevel(logging.DEBUG if debug else logging.WARNING)
