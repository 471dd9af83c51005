"""agent.signals.state: VehicleState and SignalPipeline (changes, invalid states, staleness).

Times are the frames' timestamps (the source's clock); nothing here reads the wall clock.
Steps of 1/8 s and 1/16 s keep the arithmetic exact in binary floating point.
"""

from __future__ import annotations

import pytest

from agent.signals.model import INVALID, STALE, VALID, Change
from agent.signals.state import STALE_CHECK_INTERVAL, SignalPipeline, VehicleState
from coredata import (ABS, AIR, BODY_PATHS, CLOSED, CLUSTER_PATHS, HOOD, IS_LOCKED, IS_OPEN, LOW,
                      OPEN, RANGE, REL, SNA, TRUNK, WINDOWS, body, cluster, demo_decoder,
                      window)


@pytest.fixture
def pipe():
    return SignalPipeline(demo_decoder())


def feed_all(pipe, frames) -> list[Change]:
    out = []
    for msg in frames:
        out.extend(pipe.feed(msg))
    return out


def of(changes, path) -> list[Change]:
    return [c for c in changes if c.path == path]


def assert_stale_once(changes, path, last_seen, timeout, frame_step):
    """Exactly one stale change for ``path``, no earlier than the timeout allows and no later
    than the next stale check after it."""
    stale = [c for c in of(changes, path) if c.quality == STALE]
    assert len(stale) == 1, (path, stale)
    assert stale[0].value is None
    latest = last_seen + timeout + STALE_CHECK_INTERVAL + frame_step
    assert last_seen + timeout < stale[0].t <= latest
    return stale[0]


# -- changes ---------------------------------------------------------------------------------


def test_door_toggle_gives_exactly_the_expected_changes(pipe):
    locked = (1, 1, 1, 1)
    first = pipe.feed(body(0.0, locks=locked))
    assert first == [Change(0.0, p, v, VALID) for p, v in zip(
        BODY_PATHS, [False, False, False, False, True, True, True, True, False, False])]
    assert pipe.feed(body(0.05, locks=locked)) == []                       # same frame
    assert pipe.feed(body(0.1, locks=locked, doors=(OPEN, CLOSED, CLOSED, CLOSED))) == [
        Change(0.1, IS_OPEN[0], True, VALID)]
    assert pipe.feed(body(0.125, locks=locked, doors=(OPEN, CLOSED, CLOSED, CLOSED),
                          counter=1)) == []                               # only the counter moved
    assert pipe.feed(body(0.15, locks=locked, doors=(SNA, CLOSED, CLOSED, CLOSED))) == [
        Change(0.15, IS_OPEN[0], None, INVALID)]
    assert pipe.feed(body(0.175, locks=locked, doors=(SNA, CLOSED, CLOSED, CLOSED),
                          counter=2)) == []                               # still invalid
    assert pipe.feed(body(0.2, locks=locked)) == [Change(0.2, IS_OPEN[0], False, VALID)]
    assert pipe.feed(body(0.25, locks=(0, 1, 1, 1), trunk=OPEN)) == [
        Change(0.25, IS_LOCKED[0], False, VALID), Change(0.25, TRUNK, True, VALID)]


def test_change_as_dict_is_the_json_shape():
    assert Change(1.5, RANGE, 512000, VALID).as_dict() == {
        "t": 1.5, "signal": RANGE, "value": 512000, "quality": VALID}


def test_state_apply_treats_false_and_zero_as_different_values():
    state = VehicleState(("Vehicle.A",))
    assert state.apply(1.0, [(0, 0, VALID)]) == [Change(1.0, "Vehicle.A", 0, VALID)]
    assert state.apply(2.0, [(0, 0, VALID)]) == []
    assert state.apply(3.0, [(0, False, VALID)]) == [Change(3.0, "Vehicle.A", False, VALID)]
    assert state.apply(4.0, [(0, 0.0, VALID)]) == [Change(4.0, "Vehicle.A", 0.0, VALID)]
    assert state.received == [4.0] and state.changed == [4.0]


def test_snapshot_reports_value_quality_and_age(pipe):
    pipe.feed(cluster(100.0, 156, 512, 343))
    pipe.feed(body(100.25, doors=(OPEN, CLOSED, CLOSED, CLOSED)))
    snap = pipe.state.snapshot(100.375)
    assert snap[REL] == {"value": 62.4, "quality": VALID, "age": 0.375}
    assert snap[IS_OPEN[0]] == {"value": True, "quality": VALID, "age": 0.125}
    assert snap[WINDOWS[0]] == {"value": None, "quality": STALE, "age": None}   # never seen
    assert len(snap) == 19


def test_run_yields_the_changes_of_every_frame_in_order(pipe):
    frames = [cluster(0.0, 156, 512, 343), body(0.01), cluster(0.02, 155, 512, 343)]
    changes = list(pipe.run(frames))
    assert [c.path for c in changes] == CLUSTER_PATHS + BODY_PATHS + [REL]
    assert changes[-1] == Change(0.02, REL, 62.0, VALID)


# -- staleness --------------------------------------------------------------------------------


def test_cluster_goes_stale_once_and_comes_back(pipe):
    step = 0.125
    changes = []
    # Cluster and BodyStatus every 1/8 s from t=10; Cluster stops after t=11
    for k in range(17):                       # 10.0 .. 12.0
        t = 10.0 + k * step
        if t <= 11.0:
            changes += pipe.feed(cluster(t, 156, 512, 343))
        changes += pipe.feed(body(t))
    for path in CLUSTER_PATHS:
        got = of(changes, path)
        assert len(got) == 2, got
        assert got[0].t == 10.0 and got[0].quality == VALID
        # 11.375 is the first frame more than 3 x 100 ms after the last Cluster frame
        assert got[1] == Change(11.375, path, None, STALE)
    assert all(c.quality == VALID for p in BODY_PATHS for c in of(changes, p))

    # Cluster resumes (its counter moved, like a real ECU's): valid again, once
    back = pipe.feed(cluster(12.125, 150, 500, 300, counter=1))
    assert back == [Change(12.125, REL, 60.0, VALID), Change(12.125, ABS, 30.0, VALID),
                    Change(12.125, RANGE, 500000, VALID), Change(12.125, LOW, False, VALID)]
    assert pipe.feed(cluster(12.25, 150, 500, 300, counter=2)) == []


def test_stale_signal_is_valid_again_when_the_same_frame_resumes(pipe):
    feed_all(pipe, [cluster(10.0, 156, 512, 343), body(10.0)])
    silence = feed_all(pipe, [body(10.0 + k * 0.125) for k in range(1, 5)])    # to 10.5
    assert [c.path for c in silence if c.quality == STALE][:4] == CLUSTER_PATHS
    back = pipe.feed(cluster(10.625, 156, 512, 343))
    assert [(c.path, c.value, c.quality) for c in back if c.path in CLUSTER_PATHS] == [
        (REL, 62.4, VALID), (ABS, 34.3, VALID), (RANGE, 512000, VALID), (LOW, False, VALID)]


def test_signal_never_seen_goes_stale_after_its_timeout_from_the_first_frame(pipe):
    step = 0.125
    changes = feed_all(pipe, [body(20.0 + k * step) for k in range(30)])    # 20.0 .. 23.625
    # AmbientConditions: 1000 ms x 3; WindowStatus pages: 50 ms x 4 pages x 3; Cluster 0.3 s
    assert of(changes, AIR) == [Change(23.125, AIR, None, STALE)]
    for path in WINDOWS:
        assert of(changes, path) == [Change(20.625, path, None, STALE)]
    for path in CLUSTER_PATHS:
        assert of(changes, path) == [Change(20.375, path, None, STALE)]


def test_tick_without_frames_marks_silent_signals_stale(pipe):
    pipe.feed(cluster(0.0, 156, 512, 343))
    assert pipe.tick(0.25) == []
    stale = pipe.tick(0.5)
    assert [c.path for c in stale if c.path in CLUSTER_PATHS] == CLUSTER_PATHS
    assert {c.quality for c in stale} == {STALE} and {c.t for c in stale} == {0.5}
    assert pipe.tick(0.75) == [Change(0.75, w, None, STALE) for w in WINDOWS]   # 0.6 s
    assert pipe.tick(1.0) == []
    assert pipe.tick(5.0) == [Change(5.0, AIR, None, STALE)]                     # 3 s
    assert pipe.state.snapshot(5.0)[REL] == {"value": None, "quality": STALE, "age": 5.0}


def test_mux_pages_go_stale_independently(pipe):
    step = 1 / 16
    changes = []
    last_page1 = None
    for k in range(48):                                  # 30.0 .. 32.9375
        t = 30.0 + k * step
        if k % 2 == 0:
            changes += pipe.feed(window(t, 0, 40))
        elif k < 17:
            changes += pipe.feed(window(t, 1, 20))
            last_page1 = t
    assert of(changes, WINDOWS[0]) == [Change(30.0, WINDOWS[0], 40, VALID)]   # never stale
    assert of(changes, WINDOWS[1])[0] == Change(30.0625, WINDOWS[1], 20, VALID)
    assert_stale_once(changes, WINDOWS[1], last_page1, 0.6, step)
    for path in WINDOWS[2:]:                              # pages never sent
        assert_stale_once(changes, path, 30.0, 0.6, step)
    assert len(of(changes, WINDOWS[1])) == 2


def test_stale_then_invalid_then_valid(pipe):
    changes = feed_all(pipe, [body(0.0), body(0.5, hood=SNA), body(0.625, hood=OPEN)])
    assert of(changes, HOOD) == [Change(0.0, HOOD, False, VALID),
                                 Change(0.5, HOOD, None, STALE),
                                 Change(0.5, HOOD, None, INVALID),
                                 Change(0.625, HOOD, True, VALID)]
