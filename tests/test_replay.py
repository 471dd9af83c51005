"""agent.dev.replay and `car-agent replay` on the host, through python-can's in-process `virtual` bus.

The real-kernel vcan tests live in tests/guest; these run anywhere. A receiver is opened on a
uniquely named virtual channel *before* the replay, then drained: the virtual bus delivers
copies of what the replay sent, in order, with the CAN FD flags intact.
"""

from __future__ import annotations

import gzip
import itertools
import re
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from io import StringIO
from pathlib import Path

import can
import pytest

import can.interfaces.virtual

import agent.dev.replay as replay_module
from agent.can.capture import format_candump
from agent.errors import UserError
from agent.dev.replay import (
    SLEEP_THRESHOLD_S,
    Flood,
    Gap,
    ReplayOptions,
    ReplaySummary,
    capture_span,
    parse_flood,
    parse_gap,
    parse_ids,
    parse_map,
    progress_total,
    replay,
    terminal_progress,
)
from support.waiting import SimulatedTime

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-m", "agent"]
BASE = 1700000000.0


# -- helpers -----------------------------------------------------------------------------------

def msg(t: float, ident: int, data: bytes = b"", channel: str = "can0", **kw) -> can.Message:
    return can.Message(timestamp=BASE + t, arbitration_id=ident, data=data, channel=channel,
                       is_extended_id=kw.pop("is_extended_id", ident > 0x7FF), **kw)


def write_candump(path: Path, frames: list[can.Message],
                  extra: dict[int, str] | None = None) -> Path:
    """A candump -L file of ``frames``; ``extra`` inserts raw lines before frame index N."""
    lines = []
    for i, m in enumerate(frames):
        if extra and i in extra:
            lines.append(extra[i])
        lines.append(format_candump(m))
    if extra and len(frames) in extra:
        lines.append(extra[len(frames)])
    path.write_text("\n".join(lines) + "\n")
    return path


def key(m: can.Message) -> tuple:
    """What must survive the replay (not the timestamp or channel, which the bus sets)."""
    return (m.arbitration_id, m.is_extended_id, bytes(m.data), m.is_fd, m.bitrate_switch,
            m.error_state_indicator, m.is_remote_frame, m.dlc if m.is_remote_frame else None,
            m.is_error_frame)


def drain(bus: can.BusABC) -> list[can.Message]:
    got = []
    while (m := bus.recv(timeout=0.01)) is not None:
        got.append(m)
    return got


@pytest.fixture
def vbus():
    """Factory: open a receiver on a fresh virtual channel; returns (channel name, bus)."""
    opened: list[can.BusABC] = []

    def open_(name: str | None = None) -> tuple[str, can.BusABC]:
        name = name or f"replay-test-{uuid.uuid4().hex}"
        bus = can.Bus(interface="virtual", channel=name, receive_own_messages=False)
        opened.append(bus)
        return name, bus

    yield open_
    for bus in opened:
        bus.shutdown()


@pytest.fixture
def simulated(monkeypatch) -> SimulatedTime:
    """Replay's clock and sleeps, and the virtual bus's receive stamps, on simulated time:
    timing is checked exactly, whatever the machine's speed."""
    sim = SimulatedTime()
    monkeypatch.setattr(replay_module, "time", sim)
    monkeypatch.setattr(can.interfaces.virtual, "time", sim)
    return sim


def opts(channel: str, **kw) -> ReplayOptions:
    kw.setdefault("timing", False)
    return ReplayOptions(interface="virtual", channel=channel, fd=False, **kw)


def periodic(n: int, step: float, ids=(0x100,), channel: str = "can0") -> list[can.Message]:
    """``n`` frames ``step`` s apart cycling through ``ids``; data = the frame's index."""
    return [msg(i * step, ids[i % len(ids)], i.to_bytes(2, "big"), channel=channel)
            for i in range(n)]


# The capture of the identity test: every kind of frame the bus carries.
KINDS = [
    msg(0.000, 0x3D0, bytes.fromhex("9C80157000000071")),
    msg(0.010, 0x18FF50E5, bytes.fromhex("0000AC4164000000")),          # 29-bit
    msg(0.020, 0x123, bytes.fromhex("DEADBEEF"), is_fd=True, bitrate_switch=True),
    msg(0.030, 0x456, b"", is_fd=True),                                 # FD, no BRS, empty
    msg(0.040, 0x1ABCDEF0, bytes(range(64)), is_fd=True, bitrate_switch=True,
        error_state_indicator=True),                                    # FD 64 bytes, ESI
    msg(0.050, 0x7FF, b"", is_remote_frame=True, dlc=0),
    msg(0.060, 0x1ABCDEF1, b"", is_remote_frame=True, dlc=5),
    msg(0.070, 0x000, b"\x00"),
    msg(0.080, 0x00000001, bytes(8), is_extended_id=True),              # extended, small id
    msg(0.090, 0x2B0, bytes.fromhex("0102")),
]


# -- frames arrive identical and in order ------------------------------------------------------

@pytest.mark.parametrize("timing", [False, True])
def test_frames_arrive_identical_and_in_order(tmp_path, vbus, timing):
    capture = write_candump(tmp_path / "kinds.log", KINDS)
    name, rx = vbus()
    summary = replay(capture, opts(name, timing=timing, speed=5.0))
    got = drain(rx)
    assert [key(m) for m in got] == [key(m) for m in KINDS]
    assert all(m.is_fd for m in got[2:5]) and not any(m.is_fd for m in got[:2] + got[5:])
    assert [m.bitrate_switch for m in got[2:5]] == [True, False, True]
    assert [m.error_state_indicator for m in got[2:5]] == [False, False, True]
    assert (summary.sent, summary.skipped, summary.error_frames, summary.errors,
            summary.malformed, summary.dropped, summary.withheld, summary.flooded) == (
        len(KINDS), 0, 0, 0, 0, 0, 0, 0)


def test_bus_opened_with_fd_true_carries_the_same_frames(tmp_path, vbus):
    capture = write_candump(tmp_path / "kinds.log", KINDS)
    name, rx = vbus()
    replay(capture, ReplayOptions(interface="virtual", channel=name, timing=False))  # fd=True
    assert [key(m) for m in drain(rx)] == [key(m) for m in KINDS]


def test_gzip_compressed_candump(tmp_path, vbus):
    plain = write_candump(tmp_path / "kinds.log", KINDS)
    capture = tmp_path / "kinds.log.gz"
    capture.write_bytes(gzip.compress(plain.read_bytes()))
    name, rx = vbus()
    assert replay(capture, opts(name)).sent == len(KINDS)
    assert [key(m) for m in drain(rx)] == [key(m) for m in KINDS]


def test_empty_capture_sends_nothing(tmp_path, vbus):
    capture = tmp_path / "empty.log"
    capture.write_text("")
    name, rx = vbus()
    summary = replay(capture, opts(name, timing=True))
    assert summary.sent == 0 and drain(rx) == [] and summary.percentile(0.5) is None


# -- --ids, --start/--end, --loop ---------------------------------------------------------------

def test_ids_filter(tmp_path, vbus):
    frames = periodic(30, 0.01, ids=(0x100, 0x200, 0x300))
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, ids=parse_ids("0x100,300")))
    got = drain(rx)
    expected = [m for m in frames if m.arbitration_id in (0x100, 0x300)]
    assert [key(m) for m in got] == [key(m) for m in expected]
    assert (summary.sent, summary.skipped) == (20, 10)


def test_ids_filter_matches_extended_ids(tmp_path, vbus):
    frames = [msg(0.0, 0x18FF50E5, b"\x01"), msg(0.01, 0x123, b"\x02"),
              msg(0.02, 0x18FF50E5, b"\x03")]
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    replay(capture, opts(name, ids=parse_ids("0x18FF50E5")))
    assert [bytes(m.data) for m in drain(rx)] == [b"\x01", b"\x03"]


def test_start_end_window(tmp_path, vbus):
    # Frames at 0.0, 0.1, ... 1.9 s; the window [0.45, 1.25] holds 0.5 .. 1.2 (8 frames).
    frames = periodic(20, 0.1)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, start=0.45, end=1.25))
    got = drain(rx)
    assert [bytes(m.data) for m in got] == [i.to_bytes(2, "big") for i in range(5, 13)]
    assert summary.sent == 8
    assert summary.skipped == 5          # the 5 frames before --start; --end stops reading


@pytest.mark.parametrize("start,end,expected", [
    (None, 0.35, range(0, 4)),
    (1.55, None, range(16, 20)),
    (5.0, None, range(0)),                # past the end of the capture
    (0.75, 0.55, range(0)),               # empty window
])
def test_start_or_end_alone(tmp_path, vbus, start, end, expected):
    frames = periodic(20, 0.1)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, start=start, end=end))
    assert [bytes(m.data) for m in drain(rx)] == [i.to_bytes(2, "big") for i in expected]
    assert summary.sent == len(expected)


@pytest.mark.parametrize("timing", [False, True])
def test_loop_three_times_in_order(tmp_path, vbus, timing):
    frames = periodic(12, 0.01, ids=(0x100, 0x18FF50E5))
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, loops=3, timing=timing, speed=4.0))
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames] * 3
    assert summary.sent == 36


def test_loop_with_window_repeats_the_window(tmp_path, vbus):
    frames = periodic(20, 0.1)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, loops=2, start=0.45, end=0.85))
    window = [i.to_bytes(2, "big") for i in range(5, 9)]
    assert [bytes(m.data) for m in drain(rx)] == window * 2
    assert summary.sent == 8


def test_loop_with_start_continues_without_a_pause(tmp_path, vbus, simulated):
    # Frames 0.0 .. 1.0 s (11); window from 0.75: 0.8, 0.9, 1.0, then the next loop should
    # continue one mean frame gap (0.1 s) later. The bug makes it 0.9 s.
    frames = periodic(11, 0.1)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    replay(capture, opts(name, loops=2, start=0.75, timing=True))
    got = drain(rx)
    assert [bytes(m.data)[1] for m in got] == [8, 9, 10, 8, 9, 10]
    pause = got[3].timestamp - got[2].timestamp
    assert pause == pytest.approx(0.1, abs=0.001), f"{pause:.3f} s between loops"


# -- --map: channels to buses ------------------------------------------------------------------

def test_map_routes_two_channels_and_skips_the_third(tmp_path, vbus):
    frames = []
    for i in range(30):
        chan = ("can0", "can1", "can2")[i % 3]
        frames.append(msg(i * 0.01, 0x100 + i, bytes([i]), channel=chan))
    capture = write_candump(tmp_path / "three.log", frames)
    name_a, rx_a = vbus()
    name_b, rx_b = vbus()
    summary = replay(capture, opts("unused", channel_map=parse_map(
        [f"can0={name_a}", f"can1={name_b}"])))
    got_a, got_b = drain(rx_a), drain(rx_b)
    assert [key(m) for m in got_a] == [key(m) for m in frames if m.channel == "can0"]
    assert [key(m) for m in got_b] == [key(m) for m in frames if m.channel == "can1"]
    assert {m.channel for m in got_a} == {name_a} and {m.channel for m in got_b} == {name_b}
    assert (summary.sent, summary.skipped) == (20, 10)


def test_map_two_sources_to_one_target(tmp_path, vbus):
    frames = [msg(i * 0.01, 0x100 + i, bytes([i]), channel=f"can{i % 2}") for i in range(10)]
    capture = write_candump(tmp_path / "two.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts("unused", channel_map=(("can0", name), ("can1", name))))
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]
    assert summary.sent == 10


# -- error frames, malformed lines ---------------------------------------------------------------

def test_error_frames_are_counted_and_not_sent(tmp_path, vbus):
    frames = periodic(10, 0.01)
    errors = {3: "(1700000000.025000) can0 20000004#0004000000000000",
              7: "(1700000000.065000) can0 20000080#0000000000000000",
              10: "(1700000000.095000) can0 20000001#"}
    capture = write_candump(tmp_path / "err.log", frames, errors)
    name, rx = vbus()
    summary = replay(capture, opts(name))
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]
    assert (summary.sent, summary.error_frames, summary.skipped) == (10, 3, 0)
    assert "3 error frames skipped" in summary.line()


def test_malformed_lines_are_skipped_counted_and_the_rest_sent(tmp_path, vbus, capsys):
    frames = periodic(10, 0.01)
    bad = {0: "this is not a candump line",
           4: "(1700000000.035000) can0 12#00",                 # 2-digit id
           6: "(17000000x0.055000) can0 123#00",                # bad timestamp
           9: "(1700000000.085000) can0 123#0",                 # odd data length
           10: "(1700000000.095000) can0 123#00112233445566778899"}  # 10 bytes classic
    extra = dict(bad)
    capture = write_candump(tmp_path / "bad.log", frames, extra)
    # Comments and blank lines are not malformed.
    capture.write_text("# a comment\n\n" + capture.read_text())
    name, rx = vbus()
    summary = replay(capture, opts(name))
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]
    assert (summary.sent, summary.malformed) == (10, 5)
    assert "5 malformed lines" in summary.line()
    err = capsys.readouterr().err
    assert "5 malformed line(s) skipped: line 3 (" in err and str(capture) in err


def test_malformed_lines_counted_once_per_loop(tmp_path, vbus, capsys):
    capture = write_candump(tmp_path / "bad.log", periodic(4, 0.01), {2: "garbage"})
    name, rx = vbus()
    summary = replay(capture, opts(name, loops=3))
    assert (summary.sent, summary.malformed) == (12, 3)
    assert len(drain(rx)) == 12
    assert capsys.readouterr().err.count("malformed line(s) skipped") == 1   # noted once


# -- fault injection ------------------------------------------------------------------------------

def test_drop_is_deterministic_for_a_seed(tmp_path, vbus):
    n = 1000
    frames = periodic(n, 0.001, ids=(0x100, 0x200, 0x300, 0x400))
    capture = write_candump(tmp_path / "a.log", frames)
    runs = []
    for seed in (7, 7, 8):
        name, rx = vbus()
        summary = replay(capture, opts(name, drop=0.3, seed=seed))
        got = [bytes(m.data) for m in drain(rx)]
        assert summary.sent == len(got) and summary.sent + summary.dropped == n
        assert 0 < summary.dropped < n
        assert 0.2 * n < summary.dropped < 0.4 * n          # ~30 %, binomial sd ~15 frames
        assert got == sorted(got)                           # what is left keeps its order
        runs.append((summary.dropped, got))
    assert runs[0] == runs[1]                               # same seed: the same frames
    assert runs[0][1] != runs[2][1]                         # another seed: other frames
    assert "dropped" in summary.line()


@pytest.mark.parametrize("drop,expected", [(0.0, 50), (1.0, 0)])
def test_drop_extremes(tmp_path, vbus, drop, expected):
    capture = write_candump(tmp_path / "a.log", periodic(50, 0.001))
    name, rx = vbus()
    summary = replay(capture, opts(name, drop=drop))
    assert (summary.sent, summary.dropped, len(drain(rx))) == (expected, 50 - expected, expected)


def test_gap_withholds_exactly_that_id_in_that_window(tmp_path, vbus):
    # 0x100 at 0.00, 0.10, ...; 0x200 at 0.05, 0.15, ... (40 frames, 2 s). Gap 0x200 for
    # [0.52, 1.02) withholds 0x200 at 0.55, 0.65, 0.75, 0.85, 0.95 and nothing else.
    frames = periodic(40, 0.05, ids=(0x100, 0x200))
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, gaps=(parse_gap("0x200:0.52:0.5"),)))
    withheld = {11, 13, 15, 17, 19}
    expected = [m for i, m in enumerate(frames) if i not in withheld]
    assert [key(m) for m in drain(rx)] == [key(m) for m in expected]
    assert (summary.sent, summary.withheld) == (35, 5)
    assert "5 withheld" in summary.line()


def test_two_gaps(tmp_path, vbus):
    frames = periodic(40, 0.05, ids=(0x100, 0x200))
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, gaps=(Gap(0x100, 0.0, 0.22), Gap(0x200, 1.72, 10.0))))
    # 0x100 at 0.0, 0.1, 0.2 (i = 0, 2, 4); 0x200 at 1.75, 1.85, 1.95 (i = 35, 37, 39).
    withheld = {0, 2, 4, 35, 37, 39}
    assert [bytes(m.data)[1] for m in drain(rx)] == [i for i in range(40) if i not in withheld]
    assert summary.withheld == 6


def test_flood_injects_rate_times_duration_interleaved_by_time(tmp_path, vbus):
    # Capture: 0x100 every 0.1 s from 0 to 1.0 s; flood 100/s for [0.25, 0.75): ~50 frames.
    frames = periodic(11, 0.1)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, flood=parse_flood("100:0.25:0.5")))
    got = drain(rx)
    flood = [m for m in got if m.arbitration_id != 0x100]
    capture_frames = [m for m in got if m.arbitration_id == 0x100]
    assert [key(m) for m in capture_frames] == [key(m) for m in frames]
    assert 49 <= len(flood) <= 51
    assert summary.flooded == len(flood) and summary.sent == len(got) == 11 + len(flood)
    assert all(0x700 <= m.arbitration_id <= 0x7EF and not m.is_extended_id
               and len(m.data) == 8 and not m.is_fd for m in flood)
    assert len({m.arbitration_id for m in flood}) > 10               # random ids, not one
    # Interleaved by time: flood frames only between the capture frames at 0.2 and 0.8 s,
    # ~10 of them between each pair of capture frames inside the window.
    index = {bytes(m.data)[1]: got.index(m) for m in capture_frames}
    positions = [i for i, m in enumerate(got) if m.arbitration_id != 0x100]
    assert index[2] < min(positions) and max(positions) < index[8]
    for a in (3, 4, 5, 6):
        between = index[a + 1] - index[a] - 1
        assert 9 <= between <= 11, (a, between)
    assert "flood frames" in summary.line()


def test_flood_is_deterministic_for_a_seed(tmp_path, vbus):
    capture = write_candump(tmp_path / "a.log", periodic(11, 0.1))
    runs = []
    for _ in range(2):
        name, rx = vbus()
        replay(capture, opts(name, flood=Flood(200.0, 0.0, 0.5), seed=3))
        runs.append([key(m) for m in drain(rx)])
    assert runs[0] == runs[1]


def test_flood_goes_to_the_first_mapped_target(tmp_path, vbus):
    frames = [msg(i * 0.1, 0x100, bytes([i]), channel=f"can{i % 2}") for i in range(11)]
    capture = write_candump(tmp_path / "a.log", frames)
    name_a, rx_a = vbus()
    name_b, rx_b = vbus()
    summary = replay(capture, opts("unused", channel_map=(("can0", name_a), ("can1", name_b)),
                                   flood=Flood(50.0, 0.0, 1.0)))
    got_a, got_b = drain(rx_a), drain(rx_b)
    assert all(m.arbitration_id == 0x100 for m in got_b) and len(got_b) == 5
    assert sum(m.arbitration_id != 0x100 for m in got_a) == summary.flooded > 0


def test_jitter_keeps_all_frames_in_order(tmp_path, vbus):
    frames = periodic(40, 0.005, ids=(0x100, 0x200))
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, timing=True, jitter_s=0.004, seed=5))
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]
    assert (summary.sent, summary.dropped, summary.withheld) == (40, 0, 0)


def test_faults_together(tmp_path, vbus):
    frames = periodic(200, 0.01, ids=(0x100, 0x200))
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, drop=0.1, gaps=(Gap(0x200, 0.5, 0.5),),
                                   flood=Flood(100.0, 1.0, 0.5), seed=2))
    got = drain(rx)
    own = [m for m in got if m.arbitration_id in (0x100, 0x200)]
    assert summary.sent == len(got)
    assert summary.dropped + summary.withheld + len(own) == 200
    assert summary.withheld > 0 and summary.dropped > 0 and summary.flooded == len(got) - len(own)
    # No 0x200 frame of the gap window got through.
    assert not [m for m in own
                if m.arbitration_id == 0x200 and 50 <= int.from_bytes(m.data, "big") < 100]


# -- timing -------------------------------------------------------------------------------------

def test_timing_speed_10(tmp_path, vbus, simulated):
    # 2 s capture (201 frames, 10 ms apart) at speed 10: 0.2 s of (simulated) time, each
    # frame at (t - t0) / 10 after the first.
    frames = periodic(201, 0.01)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, timing=True, speed=10.0))
    got = drain(rx)
    assert [key(m) for m in got] == [key(m) for m in frames]
    sent_at = [m.timestamp - got[0].timestamp for m in got]
    assert sent_at == pytest.approx([i * 0.001 for i in range(201)], abs=SLEEP_THRESHOLD_S)
    assert summary.wall_s == pytest.approx(0.2, abs=SLEEP_THRESHOLD_S)
    p50 = summary.percentile(0.5)
    assert p50 is not None and 0.0 <= p50 <= SLEEP_THRESHOLD_S
    assert summary.percentile(0.99) >= p50
    assert "timing error p50" in summary.line()


def test_no_timing_sends_all_without_timing_statistics(tmp_path, vbus):
    frames = periodic(201, 0.01)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, timing=False))
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]
    assert summary.sent == 201 and summary.late == [] and summary.percentile(0.5) is None
    assert "timing error" not in summary.line()


def test_progress_callback(tmp_path, vbus, simulated):
    frames = periodic(61, 0.01)                           # 0.6 s
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    calls = []
    summary = replay(capture, opts(name, timing=True, loops=2),
                     progress=lambda *a: calls.append(a))
    assert summary.sent == 122 and len(drain(rx)) == 122
    assert calls, "no progress over ~1.2 s"
    sents = [c[0] for c in calls]
    assert sents == sorted(sents) and all(0 < s <= 122 for s in sents)
    assert all(c[2] == pytest.approx(2 * 0.6) for c in calls)
    assert all(0 <= c[1] <= 1.3 for c in calls)


@pytest.mark.parametrize("start, end, loops, expected", [
    (None, None, 1, 0.6), (0.2, None, 1, 0.4), (None, 0.25, 1, 0.25), (0.2, 0.5, 2, 0.6),
    (0.2, 9.0, 1, 0.4), (0.7, None, 1, 0.0),
])
def test_progress_total_honours_the_window(tmp_path, vbus, start, end, loops, expected):
    """Issue 11.4: the progress line's total is the --start/--end window, not the whole file."""
    capture = write_candump(tmp_path / "a.log", periodic(61, 0.01))     # 0.6 s
    options = opts(vbus()[0], start=start, end=end, loops=loops)
    assert progress_total(capture_span(capture), options) == pytest.approx(expected)
    calls = []
    replay(capture, options, progress=lambda *a: calls.append(a))
    if expected:
        assert calls and all(c[2] == pytest.approx(expected) for c in calls)
        assert calls[-1][1] <= expected + 0.02     # the final state: elapsed within the total


def test_terminal_progress_line():
    out = StringIO()
    show = terminal_progress(out)
    show(10, 1.0, 4.0)
    show(20, 2.5, None)
    assert out.getvalue() == ("\rreplay: 10 frames, 1.0/4.0 s ( 25 %)   "
                              "\rreplay: 20 frames, 2.5 s   ")


# -- capture_span, summary ---------------------------------------------------------------------

def test_capture_span_of_a_candump_file(tmp_path):
    frames = [msg(0.25, 0x100), msg(1.0, 0x200), msg(3.75, 0x300)]
    capture = write_candump(tmp_path / "a.log", frames)
    assert capture_span(capture) == pytest.approx(3.5, abs=1e-6)
    # A long file: the last frame is found in the tail.
    long = write_candump(tmp_path / "long.log", periodic(5000, 0.002))
    assert capture_span(long) == pytest.approx(4999 * 0.002, abs=1e-6)
    # Trailing junk after the last frame does not hide it.
    capture.write_text(capture.read_text() + "garbage\n\n")
    assert capture_span(capture) == pytest.approx(3.5, abs=1e-6)


def test_capture_span_is_none_where_it_cannot_know(tmp_path):
    assert capture_span(tmp_path / "missing.log") is None
    (tmp_path / "empty.log").write_text("")
    assert capture_span(tmp_path / "empty.log") is None
    (tmp_path / "a.asc").write_text("date x\n")
    assert capture_span(tmp_path / "a.asc") is None
    single = write_candump(tmp_path / "one.log", [msg(1.0, 0x100)])
    assert capture_span(single) == 0.0


def test_summary_line_and_percentile():
    s = ReplaySummary(sent=100, skipped=3, error_frames=2, errors=1, wall_s=2.0)
    assert s.line() == ("replay: 100 frames sent in 2.00 s (50 frames/s), 3 skipped, "
                        "2 error frames skipped, 1 send errors")
    s = ReplaySummary(sent=10, malformed=4, dropped=1, withheld=2, flooded=3, wall_s=0.0,
                      late=[0.003, 0.001, 0.002, 0.004])
    assert s.percentile(0.5) == 0.003 and s.percentile(0.99) == 0.004
    assert s.percentile(0.0) == 0.001
    assert s.line() == ("replay: 10 frames sent in 0.00 s (0 frames/s), 0 skipped, "
                        "0 error frames skipped, 0 send errors, 4 malformed lines, "
                        "faults: 1 dropped, 2 withheld, 3 flood frames, "
                        "timing error p50 3.000 ms, p99 4.000 ms")


# -- parse_* --------------------------------------------------------------------------------------

def test_parse_valid_values():
    assert parse_ids("0x123, 2FC,,0x18FF50E5") == frozenset({0x123, 0x2FC, 0x18FF50E5})
    assert parse_ids("0x0,0x1FFFFFFF") == frozenset({0, 0x1FFFFFFF})
    assert parse_map(["can0=vcan0", "can1=vcan1"]) == (("can0", "vcan0"), ("can1", "vcan1"))
    assert parse_map([]) == ()
    assert parse_gap("0x3D0:10:2") == Gap(0x3D0, 10.0, 2.0)
    assert parse_gap("2b0:0.5:1.25") == Gap(0x2B0, 0.5, 1.25)
    assert parse_flood("3000") == Flood(3000.0, 0.0, float("inf"))
    assert parse_flood("3000:5:2") == Flood(3000.0, 5.0, 2.0)


@pytest.mark.parametrize("call,flag", [
    (lambda: parse_ids("zz"), "--ids"),
    (lambda: parse_ids("0x123,0xG"), "--ids"),
    (lambda: parse_ids("0x20000000"), "--ids"),
    (lambda: parse_ids("-1"), "--ids"),
    (lambda: parse_map(["can0"]), "--map"),
    (lambda: parse_map(["=vcan0"]), "--map"),
    (lambda: parse_map(["can0="]), "--map"),
    (lambda: parse_gap("0x3D0:10"), "--gap"),
    (lambda: parse_gap("0x3D0:a:2"), "--gap"),
    (lambda: parse_gap("zz:1:2"), "--gap"),
    (lambda: parse_gap("0x3D0:1:2:3"), "--gap"),
    (lambda: parse_flood("fast"), "--flood"),
    (lambda: parse_flood("100:1"), "--flood"),
    (lambda: parse_flood("100:a:1"), "--flood"),
    (lambda: parse_flood("1:2:3:4"), "--flood"),
])
def test_parse_errors_are_one_line_user_errors_naming_the_flag(call, flag):
    with pytest.raises(UserError) as info:
        call()
    text = str(info.value)
    assert text.startswith(f"{flag}: ") and "\n" not in text


@pytest.mark.parametrize("text", ["0", "-5", "inf", "0:1:2", "nan"])
def test_parse_flood_rejects_a_rate_that_is_not_positive_and_finite(text):
    with pytest.raises(UserError, match="^--flood: "):
        parse_flood(text)


# -- stop, streaming, memory ---------------------------------------------------------------------

def test_stop_callback_ends_the_replay_early(tmp_path, vbus):
    frames = periodic(100, 0.01)
    capture = write_candump(tmp_path / "a.log", frames)
    name, rx = vbus()
    calls = itertools.count(1)
    summary = replay(capture, opts(name, timing=True), stop=lambda: next(calls) > 5)
    assert summary.sent == 5
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames[:5]]


def test_stop_callback_before_the_first_frame(tmp_path, vbus):
    capture = write_candump(tmp_path / "a.log", periodic(10, 0.01))
    name, rx = vbus()
    summary = replay(capture, opts(name), stop=lambda: True)
    assert summary.sent == 0 and drain(rx) == []


def test_stop_keeps_the_malformed_count(tmp_path, vbus):
    capture = write_candump(tmp_path / "a.log", periodic(10, 0.01), {2: "garbage", 4: "junk"})
    name, rx = vbus()
    calls = itertools.count(1)
    summary = replay(capture, opts(name), stop=lambda: next(calls) > 8)
    assert summary.sent == 8
    assert summary.malformed == 2


BIG_LINES = 200_000


@pytest.fixture(scope="module")
def big_capture(tmp_path_factory) -> Path:
    """200,000 candump lines, 0.5 ms apart (~100 s, ~9 MB)."""
    path = tmp_path_factory.mktemp("big") / "big.log"
    with open(path, "w") as f:
        for i in range(BIG_LINES):
            f.write(f"({BASE + i * 0.0005:.6f}) can0 {0x100 + i % 0x500:03X}#"
                    f"{i:08X}11223344\n")
    return path


def test_streaming_stop_after_1000_frames_of_a_large_file(big_capture, vbus):
    name, rx = vbus()
    calls = itertools.count(1)
    summary = replay(big_capture, opts(name), stop=lambda: next(calls) > 1000)
    got = drain(rx)
    assert summary.sent == len(got) == 1000
    assert [int.from_bytes(m.data[:4], "big") for m in got] == list(range(1000))
    assert got[0].arbitration_id == 0x100 and got[-1].arbitration_id == 0x100 + 999


def test_streaming_memory_stays_small_for_a_large_file(big_capture):
    # Nobody listens on this channel: the virtual bus keeps no copies, so what is measured is
    # the replay's own memory. A bound on memory, not on speed.
    assert capture_span(big_capture) == pytest.approx((BIG_LINES - 1) * 0.0005, abs=1e-5)
    tracemalloc.start()
    try:
        summary = replay(big_capture, opts(f"replay-test-{uuid.uuid4().hex}"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.sent == BIG_LINES and summary.malformed == 0
    assert peak < 20 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


# -- ASC and BLF ------------------------------------------------------------------------------

def vector_frames() -> list[can.Message]:
    """Frames for ASC/BLF (channels are python-can's 0-based ints)."""
    return [
        msg(0.000, 0x3D0, bytes.fromhex("9C80157000000071"), channel=0),
        msg(0.010, 0x18FF50E5, bytes.fromhex("0000AC4164000000"), channel=1),
        msg(0.020, 0x123, bytes(range(12)), channel=0, is_fd=True, bitrate_switch=True),
        msg(0.030, 0x7FF, b"", channel=0),
        msg(0.040, 0x2B0, bytes.fromhex("0102"), channel=1),
        msg(0.050, 0x1ABCDEF0, bytes(range(64)), channel=0, is_fd=True),
    ]


def write_vector(path: Path, frames: list[can.Message]) -> Path:
    writer = can.ASCWriter(str(path)) if path.suffix == ".asc" else can.BLFWriter(str(path))
    for m in frames:
        writer.on_message_received(m)
    writer.stop()
    return path


@pytest.mark.parametrize("suffix", [".asc", ".blf"])
def test_asc_and_blf_replay_identically(tmp_path, vbus, suffix):
    frames = vector_frames()
    capture = write_vector(tmp_path / f"x{suffix}", frames)
    name, rx = vbus()
    summary = replay(capture, opts(name, timing=True, speed=2.0))
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]
    assert (summary.sent, summary.malformed, summary.errors) == (len(frames), 0, 0)


@pytest.mark.parametrize("suffix", [".asc", ".blf"])
def test_asc_and_blf_channels_are_mapped_one_based(tmp_path, vbus, suffix):
    frames = vector_frames()
    capture = write_vector(tmp_path / f"x{suffix}", frames)
    name_a, rx_a = vbus()
    name_b, rx_b = vbus()
    summary = replay(capture, opts("unused", channel_map=(("1", name_a), ("2", name_b))))
    assert [key(m) for m in drain(rx_a)] == [key(m) for m in frames if m.channel == 0]
    assert [key(m) for m in drain(rx_b)] == [key(m) for m in frames if m.channel == 1]
    assert summary.sent == len(frames)


@pytest.mark.parametrize("suffix", [".asc", ".blf"])
def test_asc_and_blf_window_and_ids(tmp_path, vbus, suffix):
    frames = vector_frames()
    capture = write_vector(tmp_path / f"x{suffix}", frames)
    name, rx = vbus()
    replay(capture, opts(name, start=0.015, end=0.045, ids=frozenset({0x123, 0x2B0, 0x3D0})))
    assert [m.arbitration_id for m in drain(rx)] == [0x123, 0x2B0]


def test_trc_replays_identically(tmp_path, vbus):
    frames = [msg(i * 0.01, 0x100 + i, bytes([i]) * (i % 9), channel=0,
                  is_extended_id=bool(i % 2)) for i in range(10)]
    capture = tmp_path / "x.trc"
    writer = can.TRCWriter(str(capture))
    for m in frames:
        writer.on_message_received(m)
    writer.stop()
    name, rx = vbus()
    assert replay(capture, opts(name)).sent == 10
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]


def test_truncated_blf_sends_what_it_has_then_fails_with_one_line(tmp_path, vbus):
    frames = [msg(i * 0.001, 0x100 + i % 16, bytes([i % 256]), channel=0) for i in range(500)]
    whole = write_vector(tmp_path / "whole.blf", frames)
    capture = tmp_path / "cut.blf"
    capture.write_bytes(whole.read_bytes()[:-100])
    name, rx = vbus()
    with pytest.raises(UserError) as info:
        replay(capture, opts(name))
    assert "BLF file truncated" in str(info.value) and "\n" not in str(info.value)
    got = drain(rx)
    assert 0 < len(got) < 500
    assert [key(m) for m in got] == [key(m) for m in frames[:len(got)]]


def test_format_override_and_unknown_extension(tmp_path, vbus):
    frames = periodic(5, 0.01)
    capture = write_candump(tmp_path / "a.txt", frames)
    with pytest.raises(UserError, match="unknown capture format"):
        replay(capture, opts("unused"))
    name, rx = vbus()
    assert replay(capture, opts(name, capture_format="candump")).sent == 5
    assert [key(m) for m in drain(rx)] == [key(m) for m in frames]


# -- the command line ---------------------------------------------------------------------------

def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(AGENT + ["replay", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("car-agent replay: error: "), result.stderr
    return lines[0]


def test_cli_prints_the_summary_and_exits_0(tmp_path):
    capture = write_candump(tmp_path / "kinds.log", KINDS,
                            {3: "(1700000000.025000) can0 20000004#0004000000000000"})
    result = run_cli(str(capture), "--interface", "virtual", "--channel",
                     f"cli-{uuid.uuid4().hex}", "--speed", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert f"replay: {len(KINDS)} frames sent in " in result.stderr
    assert "0 skipped, 1 error frames skipped, 0 send errors" in result.stderr
    assert "timing error p50" in result.stderr


def test_cli_options_reach_the_replay(tmp_path):
    frames = periodic(40, 0.05, ids=(0x100, 0x200))
    capture = write_candump(tmp_path / "a.log", frames, {5: "garbage"})
    result = run_cli(str(capture), "--interface", "virtual", "--channel", "x", "--no-timing",
                     "--no-fd", "--quiet", "--loop", "2", "--ids", "0x200", "--start", "0.5",
                     "--gap", "0x200:1.02:0.5", "--flood", "100:0.6:0.3", "--drop", "0",
                     "--seed", "3")
    assert result.returncode == 0, result.stderr
    # Per loop: 0x200 in [0.5, 1.95] is 15 frames, 5 withheld (1.05 .. 1.45), 10 sent; the
    # flood (not subject to --ids) adds 100/s x 0.3 s = 30 +- 1.
    found = re.search(r"replay: (\d+) frames sent .*faults: 0 dropped, (\d+) withheld, "
                      r"(\d+) flood frames", result.stderr)
    assert found, result.stderr
    sent, withheld, flooded = map(int, found.groups())
    assert withheld == 10 and 58 <= flooded <= 62 and sent == 20 + flooded
    assert "2 malformed lines" in result.stderr
    assert "1 malformed line(s) skipped: line 6 (" in result.stderr


def test_cli_map(tmp_path):
    frames = [msg(i * 0.01, 0x100, bytes([i]), channel=f"can{i % 3}") for i in range(9)]
    capture = write_candump(tmp_path / "a.log", frames)
    result = run_cli(str(capture), "--interface", "virtual", "--no-timing",
                     "--map", "can0=a", "--map", "can1=b")
    assert result.returncode == 0, result.stderr
    assert "replay: 6 frames sent in " in result.stderr and ", 3 skipped," in result.stderr


def test_cli_missing_file_exits_2(tmp_path):
    result = run_cli(str(tmp_path / "nope.log"), "--interface", "virtual", "--channel", "x")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "nope.log: capture file not found" in line


def _host_has_socketcan() -> bool:
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(_host_has_socketcan(), reason="this host has SocketCAN")
def test_cli_socketcan_on_a_host_without_it_exits_2(tmp_path):
    capture = write_candump(tmp_path / "a.log", periodic(3, 0.01))
    result = run_cli(str(capture), "--channel", "vcan0")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "cannot open socketcan vcan0" in line and "no SocketCAN" in line


@pytest.mark.parametrize("args,needle", [
    (["--ids", "zz"], "--ids: 'zz' is not a hex frame id"),
    (["--loop", "0"], "--loop: expected 1 or more"),
    (["--loop", "-3"], "--loop: expected 1 or more"),
    (["--drop", "1.5"], "--drop: expected a fraction"),
    (["--map", "can0"], "--map: 'can0' is not SOURCE=TARGET"),
    (["--gap", "0x100"], "--gap: '0x100' is not ID:START:DURATION"),
    (["--flood", "fast"], "--flood: 'fast' is not RATE"),
])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, args, needle):
    capture = write_candump(tmp_path / "a.log", periodic(3, 0.01))
    result = run_cli(str(capture), "--interface", "virtual", "--channel", "x", *args)
    assert result.returncode == 2
    assert needle in one_error_line(result)


def test_cli_flood_zero_exits_2_with_one_line(tmp_path):
    capture = write_candump(tmp_path / "a.log", periodic(3, 0.01))
    result = run_cli(str(capture), "--interface", "virtual", "--channel", "x", "--flood", "0")
    assert result.returncode == 2, result.stderr
    assert "--flood" in one_error_line(result)


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_cli_sigterm_stops_the_replay_with_a_summary_and_exit_130(tmp_path):
    # 30 s of capture at speed 1: SIGTERM once the replay has installed its handler.
    capture = write_candump(tmp_path / "a.log", periodic(301, 0.1))
    proc = subprocess.Popen(AGENT + ["replay", str(capture), "--interface", "virtual",
                                     "--channel", "x"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _catches_sigterm(proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the replay never installed its SIGTERM handler"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    found = re.search(r"replay: (\d+) frames sent", err)
    assert found, err
    assert 0 < int(found.group(1)) < 301


def test_cli_a_transmit_queue_that_stays_full_is_exit_2_with_one_line(tmp_path, vbus, simulated,
                                                                      monkeypatch, capsys):
    """README: replay exits 2 with one line when the transmit queue stays full for 2 s."""
    from agent.cli import main

    capture = write_candump(tmp_path / "a.log", periodic(5, 0.01))
    name, rx = vbus()
    attempts = []

    def full(self, msg, timeout=None):
        attempts.append(simulated.monotonic())
        raise can.CanOperationError("Transmit buffer full")

    monkeypatch.setattr(can.interfaces.virtual.VirtualBus, "send", full)
    code = main(["replay", str(capture), "--interface", "virtual", "--channel", name,
                 "--no-timing", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == ["car-agent replay: error: transmit queue full for 2 s: the bus "
                                "does not take frames"]
    assert drain(rx) == []
    # It kept retrying the first frame for 2 s (of simulated time), not one attempt, not forever.
    assert attempts[-1] - attempts[0] == pytest.approx(2.0, abs=0.01) and len(attempts) > 100


# -- a capture clock that jumps (issue 13.11) --------------------------------------------------

@pytest.mark.parametrize("jump", [10 * 86400.0, -3600.0, 1e300])
def test_clock_jump_is_not_waited_for(tmp_path, vbus, monkeypatch, jump):
    """+10 days, -1 h, or a far-future timestamp between two frames: every frame is sent, the
    replay never sleeps for the jump (nor raises OverflowError), and the jump is reported."""
    from agent.dev import replay as rp

    frames = periodic(4, 0.01) + [msg(jump + 0.03 + i * 0.01, 0x100, bytes([i])) for i in range(3)]
    capture = write_candump(tmp_path / "a.log", frames)
    sleeps: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        assert seconds < 5, f"replay sleeps {seconds} s"
        real_sleep(seconds)

    monkeypatch.setattr(rp.time, "sleep", sleep)
    name, rx = vbus()
    summary = replay(capture, opts(name, timing=True))
    assert summary.sent == 7 and len(drain(rx)) == 7
    assert summary.jumps == 1 and "1 clock jump(s) over 60 s not waited for" in summary.line()


def test_cli_far_future_timestamp_is_a_warning_not_a_traceback(tmp_path):
    capture = tmp_path / "a.log"
    capture.write_text("(1700000000.000000) can0 100#01\n(1e300) can0 100#02\n"
                       "(1700000000.010000) can0 100#03\n")
    result = run_cli(str(capture), "--interface", "virtual", "--channel",
                     f"cli-{uuid.uuid4().hex}", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "OverflowError" not in result.stderr
    assert "replay: 3 frames sent" in result.stderr and "2 clock jump(s)" in result.stderr
