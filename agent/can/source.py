"""Where frames come from: a live python-can bus, or a capture file replayed in (or out of) time.

Both offer the same small interface, :class:`FrameSource`, so the daemon's loop does not care.

Time: a source's clock (``now()`` and the frames' ``timestamp``) measures intervals (rate
limits, heartbeats, held changes, staleness), so it must not jump. A live bus uses the
monotonic clock (the wall clock steps when NTP or GNSS answers; it is used only for the signed
``ts``). A capture's own clock is re-based by :class:`Timeline` where it goes backwards or jumps
ahead by more than :data:`MAX_CAPTURE_JUMP_S`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import can

from agent.can.capture import CaptureReader, open_capture
from agent.config import CanConfig
from agent.errors import TransientError

log = logging.getLogger("car_agent.source")

#: A capture's clock moving ahead by more than this between two frames is a clock step.
MAX_CAPTURE_JUMP_S = 3600.0


class Timeline:
    """Capture timestamps made fit for intervals: never backwards, never a jump ahead.

    A frame whose timestamp goes back, or ahead by more than ``max_jump_s``, is taken to
    follow the previous frame at once, and every later frame is shifted by the same amount
    (re-based), so one far-future timestamp neither freezes nor disables the clock.
    """

    def __init__(self, max_jump_s: float = MAX_CAPTURE_JUMP_S) -> None:
        self.max_jump_s = max_jump_s
        self.offset = 0.0
        self.last: float | None = None
        self.rebased = 0

    def __call__(self, t: float) -> float:
        last = self.last
        t += self.offset
        if last is not None and (t < last or t - last > self.max_jump_s):
            self.offset += last - t
            self.rebased += 1
            t = last
        self.last = t
        return t

    def frames(self, frames: Iterable[can.Message]) -> Iterator[can.Message]:
        """``frames`` with their timestamps re-based (in place)."""
        for msg in frames:
            msg.timestamp = self(msg.timestamp)
            yield msg


class FrameSource:
    """``recv(timeout)`` returns the next frame or None; ``now()`` is the source's clock."""

    finished = False

    def recv(self, timeout: float) -> can.Message | None:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def summary(self) -> str:
        return ""

    def health(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class BusSource(FrameSource):
    """A python-can bus opened for receiving only.

    The agent is a listener: it never calls ``send`` on the vehicle bus (a compromised or buggy
    agent must not be able to inject frames). Kernel filters (``can_filters``) keep the frames
    the mapping does not need out of this process entirely. A bus that goes away (``ip link
    set can0 down``, a USB adapter unplugged) is reported and reopened once it is back; it never
    ends the daemon.
    """

    REOPEN_INTERVAL_S = 1.0

    def __init__(self, config: CanConfig, can_filters: list[dict] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.kwargs = {"interface": config.interface, "channel": config.channel,
                       "can_filters": can_filters, "receive_own_messages": False}
        if config.fd:
            self.kwargs["fd"] = True
        if config.bitrate:
            self.kwargs["bitrate"] = config.bitrate
        self.description = f"{config.interface} {config.channel or ''}".strip()
        self.sysfs = (Path("/sys/class/net") / config.channel
                      if config.interface == "socketcan" and config.channel else None)
        self.frames = 0
        self.errors = 0
        self.down_events = 0
        self.up_events = 0
        self._down_since: float | None = None
        self._next_reopen = 0.0
        self.bus: can.BusABC | None = self._open(initial=True)

    def _open(self, initial: bool = False) -> can.BusABC | None:
        try:
            return can.Bus(**self.kwargs)
        except (can.CanError, OSError, ValueError, ImportError, NotImplementedError) as exc:
            if initial:
                raise TransientError(f"can: cannot open {self.description}: {exc}"
                                f"{socketcan_hint(exc, self.kwargs.get('channel'))}") from None
            return None

    def recv(self, timeout: float) -> can.Message | None:
        bus = self.bus
        if bus is None:
            return self._reopen(timeout)
        try:
            msg = bus.recv(timeout)
        except (can.CanError, OSError) as exc:
            self._went_down(exc)
            return None
        if msg is not None:
            self.frames += 1
            # The kernel stamps frames with the wall clock, which steps: intervals need ours.
            msg.timestamp = self.clock()
        return msg

    def _went_down(self, exc: Exception) -> None:
        self.errors += 1
        self.down_events += 1
        self._down_since = time.monotonic()
        log.warning("CAN bus %s is down (%s); the agent keeps running and reopens it when it "
                    "is back", self.description, exc)
        try:
            self.bus.shutdown()
        except Exception:  # noqa: BLE001 - a broken bus may fail to close too
            pass
        self.bus = None
        self._next_reopen = time.monotonic() + self.REOPEN_INTERVAL_S

    def _reopen(self, timeout: float) -> None:
        now = time.monotonic()
        if now < self._next_reopen or not self.link_up():
            time.sleep(timeout)
            return None
        self._next_reopen = now + self.REOPEN_INTERVAL_S
        self.bus = self._open()
        if self.bus is not None:
            self.up_events += 1
            log.warning("CAN bus %s is up again after %.1f s", self.description,
                        now - (self._down_since or now))
            self._down_since = None
        return None

    def link_up(self) -> bool:
        """The interface's IFF_UP flag (socketcan); True where it cannot be known."""
        if self.sysfs is None:
            return True
        try:
            return bool(int((self.sysfs / "flags").read_text(), 16) & 0x1)
        except (OSError, ValueError):
            return False

    def health(self) -> dict:
        health = {"bus": self.description, "state": "up" if self.bus is not None else "down",
                  "frames": self.frames, "down_events": self.down_events,
                  "up_events": self.up_events}
        if self.sysfs is not None:
            for name in ("rx_dropped", "rx_errors", "rx_packets", "tx_packets"):
                try:
                    health[name] = int((self.sysfs / "statistics" / name).read_text())
                except (OSError, ValueError):
                    pass
        return health

    def now(self) -> float:
        return self.clock()

    def summary(self) -> str:
        return (f"{self.description}: {self.frames} frames received, {self.down_events} "
                f"bus-down event(s)")

    def close(self) -> None:
        if self.bus is not None:
            try:
                self.bus.shutdown()
            except Exception:  # noqa: BLE001 - closing a broken bus must not mask the real exit
                pass


def socketcan_hint(exc: Exception, channel: str | None) -> str:
    text = str(exc)
    if "Address family not supported" in text:
        return " (this kernel has no SocketCAN; tools/vcan-vm runs a kernel that has)"
    if "No such device" in text and channel:
        return (f" (no interface {channel}; for a virtual one: sudo modprobe vcan && sudo ip link "
                f"add dev {channel} type vcan && sudo ip link set up {channel})")
    return ""


class CaptureSource(FrameSource):
    """A capture file; with ``realtime`` the frames come at the capture's pace (monotonic clock)."""

    def __init__(self, reader: CaptureReader, realtime: bool, speed: float = 1.0) -> None:
        self.reader = reader
        self.realtime = realtime
        self.speed = speed
        self.timeline = Timeline()
        self._frames: Iterator[can.Message] = self.timeline.frames(reader)
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

    def health(self) -> dict:
        return {"capture": str(self.reader.path), "frames": self.reader.frames,
                "malformed": self.reader.malformed}

    def summary(self) -> str:
        text = f"{self.reader.path}: {self.reader.frames} frames replayed"
        if self.timeline.rebased:
            text += (f"; its clock went back or jumped ahead {self.timeline.rebased} time(s) "
                     "(re-based)")
        bad = self.reader.malformed_summary()
        return f"{text}; {bad}" if bad else text

    def close(self) -> None:
        self.reader.close()


def open_source(config: CanConfig, can_filters: list[dict] | None) -> FrameSource:
    if config.capture is not None:
        return CaptureSource.open(config)
    return BusSource(config, can_filters)
