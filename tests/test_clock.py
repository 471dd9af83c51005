"""Clock steps: intervals (rate cap, heartbeat, held changes, staleness) run on a clock that
never jumps; the wall clock is only for ``ts``. Live frames are stamped with an injected
monotonic clock while their kernel (wall-clock) timestamps step back and forth; captures whose
clock goes back or jumps ahead are re-based instead of freezing."""

from __future__ import annotations

import uuid

import can
import pytest

from agent.can import source as source_module
from agent.can.source import BusSource, CaptureSource, Timeline
from agent.config import CanConfig, PolicyConfig
from agent.signals.model import STALE
from agent.signals.policy import PublishPolicy
from agent.signals.state import SignalPipeline
from coredata import BODY_PATHS, CLOSED, IS_OPEN, OPEN, TRUNK, body, demo_decoder

HOUR = 3600.0
WALL = 1_780_000_000.0


class Live:
    """A virtual CAN bus whose frames carry the (stepping) wall clock as their kernel
    timestamp, received by a BusSource whose monotonic clock is ``self.mono``; the wall clock
    ``self.wall`` is also what ``time.time()`` says in the source module. Pipeline and policy
    are driven as in the daemon."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        channel = f"clock-{uuid.uuid4().hex}"
        self.sender = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
        self.mono = 100.0
        self.wall = WALL
        monkeypatch.setattr(source_module.time, "time", lambda: self.wall)
        self.source = BusSource(CanConfig(interface="virtual", channel=channel), None,
                                clock=lambda: self.mono)
        self.decoder = demo_decoder()
        self.pipeline = SignalPipeline(self.decoder)
        self.policy = PublishPolicy(self.decoder.paths, PolicyConfig(heartbeat_s=60.0))
        self.out: list = []

    def later(self, seconds: float, step: float = 0.0) -> None:
        """``seconds`` pass; the wall clock also steps by ``step``."""
        self.mono += seconds
        self.wall += seconds + step

    def frame(self, **doors) -> None:
        self.sender.send(body(self.wall, **doors))
        msg = self.source.recv(5.0)
        assert msg is not None
        self.policy.observe(self.pipeline.feed(msg))
        self.out.extend(self.policy.due(self.source.now()))

    def idle(self) -> list:
        changes = self.pipeline.tick(self.source.now())
        self.policy.observe(changes)
        self.out.extend(self.policy.due(self.source.now()))
        return changes

    def close(self) -> None:
        self.source.close()
        self.sender.shutdown()


@pytest.fixture
def live(monkeypatch):
    bus = Live(monkeypatch)
    yield bus
    bus.close()


def door_events(out: list) -> list:
    return [c.value for o in out if o.kind == "event" for c in o.changes if c.path == IS_OPEN[0]]


ALL_CLOSED = {"doors": (CLOSED,) * 4}
DRIVER_OPEN = {"doors": (OPEN,) + (CLOSED,) * 3}


def test_wall_clock_stepped_back_holds_nothing(live):
    live.frame(**ALL_CLOSED)
    live.later(0.1)
    live.frame(**ALL_CLOSED)
    live.later(0.1, step=-HOUR)        # NTP steps the clock back an hour
    live.frame(**DRIVER_OPEN)
    live.later(0.3)                    # the rate cap's next token
    live.frame(**DRIVER_OPEN)
    assert door_events(live.out) == [False, True]        # not held for an hour
    live.later(0.3)
    live.frame(**ALL_CLOSED)
    assert door_events(live.out) == [False, True, False]
    snapshots = sum(o.kind == "state" for o in live.out)
    for _ in range(610):               # a minute of frames, 10 per second
        live.later(0.1)
        live.frame(**ALL_CLOSED)
    assert sum(o.kind == "state" for o in live.out) > snapshots   # the heartbeat came


def test_wall_clock_stepped_forward_fakes_no_staleness(live):
    live.frame(**ALL_CLOSED)
    for _ in range(5):
        live.later(0.1, step=HOUR)     # forward an hour between two frames
        assert not [c for c in live.idle() if c.path in BODY_PATHS]
        live.frame(**ALL_CLOSED)
    assert not any(c.quality == STALE and c.path in BODY_PATHS
                   for o in live.out for c in o.changes)
    live.later(10.0)                   # then the frames really stop
    stale = live.idle()
    assert IS_OPEN[0] in {c.path for c in stale} and {c.quality for c in stale} == {STALE}


def test_live_source_stamps_frames_with_its_monotonic_clock(live):
    live.mono = 42.5
    live.sender.send(body(WALL - 7 * HOUR))
    msg = live.source.recv(5.0)
    assert msg.timestamp == 42.5 and live.source.now() == 42.5


# --------------------------------------------------------------------------- captures


def test_timeline_rebases_backwards_and_far_future_timestamps():
    timeline = Timeline(max_jump_s=HOUR)
    raw = [10.0, 11.0, 5.0, 6.0, 10 * 86400.0, 10 * 86400.0 + 2, 12.0, 12.5]
    assert [timeline(t) for t in raw] == [10.0, 11.0, 11.0, 12.0, 12.0, 14.0, 14.0, 14.5]
    assert timeline.rebased == 3


def test_one_far_future_frame_does_not_disable_staleness_offline():
    decoder = demo_decoder()
    pipeline = SignalPipeline(decoder)
    t = [0.0, 0.1, 0.2, 10 * 86400.0] + [0.3 + 0.1 * k for k in range(5)]
    frames = [body(x) for x in t]
    changes = list(pipeline.run(frames))
    assert not any(c.quality == STALE and c.path in BODY_PATHS for c in changes)
    # The body frames stop; five seconds later (capture time, re-based) they are stale.
    later = pipeline.tick(frames[-1].timestamp + 5.0)
    assert TRUNK in {c.path for c in later} and {c.quality for c in later} == {STALE}


def test_realtime_capture_with_a_far_future_frame_does_not_freeze():
    frames = [body(WALL), body(WALL + 0.01), body(WALL + 10 * 86400), body(WALL + 0.02),
              body(WALL + 0.03)]
    source = CaptureSource(frames, realtime=True)
    got = []
    for _ in range(200):                      # each recv waits at most its 0.05 s timeout
        msg = source.recv(0.05)
        if msg is not None:
            got.append(msg)
        if source.finished:
            break
    assert len(got) == 5
    assert [round(m.timestamp - WALL, 3) for m in got] == [0.0, 0.01, 0.01, 0.01, 0.02]
