"""Where frames come from: a live python-can bus, or a capture file replayed in (or out of) time.

Both offer the same small interface, :class:`FrameSource`, so the daemon's loop does not care.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import can

from .capture import CaptureReader, open_capture
from .config import CanConfig
from .errors import UserError

log = logging.getLogger("car_agent.source")


class FrameSource:
    """``recv(timeout)`` returns the next frame or None; ``now()`` is the source's clock."""

    finished = False

    def recv(self, timeout: float) -> can.Message | None:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def summary(self) -> str:
        return ""

    def close(self) -> None:
        pass


class BusSource(FrameSource):
    """A python-can bus opened for receiving only.

    The agent is a listener: it never calls ``send`` on the vehicle bus. Kernel filters
    (``can_filters``) keep the frames the mapping does not need out of this process entirely.
    """

    def __init__(self, config: CanConfig, can_filters: list[dict] | None) -> None:
        kwargs = {"interface": config.interface, "channel": config.channel,
                  "can_filters": can_filters, "receive_own_messages": False}
        if config.fd:
            kwargs["fd"] = True
        if config.bitrate:
            kwargs["bitrate"] = config.bitrate
        self.description = f"{config.interface} {config.channel or ''}".strip()
        try:
            self.bus = can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError, ImportError, NotImplementedError) as exc:
            raise UserError(f"can: cannot open {self.description}: {exc}") from None
        self.frames = 0
        self.errors = 0

    def recv(self, timeout: float) -> can.Message | None:
        try:
            msg = self.bus.recv(timeout)
        except (can.CanError, OSError) as exc:
            # A bus going down (ip link set down) must not end the daemon: report, wait, retry.
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                log.warning("CAN receive error on %s (%d so far): %s", self.description,
                            self.errors, exc)
            time.sleep(min(timeout, 0.5))
            return None
        if msg is not None:
            self.frames += 1
        return msg

    def now(self) -> float:
        return time.time()

    def summary(self) -> str:
        return f"{self.description}: {self.frames} frames received, {self.errors} receive errors"

    def close(self) -> None:
        try:
            self.bus.shutdown()
        except Exception:  # noqa: BLE001 - closing a broken bus must not mask the real exit
            pass


class CaptureSource(FrameSource):
    """A capture file; with ``realtime`` the frames come at the capture's pace (monotonic clock)."""

    def __init__(self, reader: CaptureReader, realtime: bool, speed: float = 1.0) -> None:
        self.reader = reader
        self.realtime = realtime
        self.speed = speed
        self._frames: Iterator[can.Message] = iter(reader)
        self._pending: can.Message | None = None
        self._t0: float | None = None        # capture time of the first frame
        self._m0 = 0.0                       # monotonic time it was delivered
        self._now = time.time()

    @classmethod
    def open(cls, config: CanConfig) -> "CaptureSource":
        reader = open_capture(config.capture, config.capture_format, config.capture_channel)
        return cls(reader, config.realtime)

    def recv(self, timeout: float) -> can.Message | None:
        if self._pending is None:
            self._pending = next(self._frames, None)
            if self._pending is None:
                self.finished = True
                time.sleep(min(timeout, 0.01))
                return None
        msg = self._pending
        if self.realtime:
            if self._t0 is None:
                self._t0, self._m0 = msg.timestamp, time.monotonic()
            due = self._m0 + (msg.timestamp - self._t0) / self.speed
            wait = due - time.monotonic()
            if wait > 0:
                if wait > timeout:
                    time.sleep(timeout)
                    self._now = self._t0 + (time.monotonic() - self._m0) * self.speed
                    return None
                time.sleep(wait)
        self._pending = None
        self._now = msg.timestamp
        return msg

    def now(self) -> float:
        return self._now

    def summary(self) -> str:
        text = f"{self.reader.path}: {self.reader.frames} frames replayed"
        bad = self.reader.malformed_summary()
        return f"{text}; {bad}" if bad else text

    def close(self) -> None:
        self.reader.close()


def open_source(config: CanConfig, can_filters: list[dict] | None) -> FrameSource:
    if config.capture is not None:
        return CaptureSource.open(config)
    return BusSource(config, can_filters)
