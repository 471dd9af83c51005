"""agent.signals.policy (PublishPolicy) and the ``policy:`` section of the config.

The policy is pure: every test passes the source's time in explicitly (``observe`` takes
changes stamped with it, ``due(now)`` / ``flush(now)`` take it as an argument); nothing here
reads a clock. Times are multiples of 1/100 s or whole seconds, well away from any boundary
unless a test is about the boundary.

Contract under test (from the issue): doors/trunk/hood/windows go out at once as events;
numeric signals use a deadband (fuel 1 %, range 1000 m) and a minimum interval (the latest
value is held and released at the interval); quality changes always go out; a full snapshot
on change at most every ``snapshot_min_interval_s`` and as a heartbeat every ``heartbeat_s``;
a flood is capped in messages per second by batching, never by dropping (unless the
``max_pending_batches`` bound is hit, and then every collapsed change is counted).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load_config
from agent.errors import ConfigError
from agent.config import DEFAULT_DEADBANDS, DEFAULT_IMMEDIATE, PolicyConfig
from agent.signals.policy import Outgoing, PublishPolicy
from agent.signals.model import INVALID, STALE, VALID, Change
from coredata import (ABS, AIR, HOOD, IS_LOCKED, IS_OPEN, LOW, REL, RANGE, REPO, TRUNK,
                      WINDOWS, one_line, write)

DOOR = IS_OPEN[0]
WINDOW = WINDOWS[0]
SUNROOF = "Vehicle.Cabin.Sunroof.Position"
SEAT = "Vehicle.Cabin.Seat.Row1.DriverSide.Position"     # numeric, no deadband, not immediate
MODE = "Vehicle.Powertrain.Transmission.DriveMode"       # a string-valued signal
PATHS = (DOOR, IS_OPEN[1], IS_LOCKED[0], TRUNK, HOOD, WINDOW, WINDOWS[1], SUNROOF, LOW,
         REL, ABS, RANGE, AIR, SEAT, MODE)
T0 = 1_767_225_600.0   # the simulator's epoch: realistic source timestamps


def make(paths=PATHS, **config) -> PublishPolicy:
    return PublishPolicy(tuple(paths), PolicyConfig(**config))


def ch(t: float, path: str, value, quality: str = VALID) -> Change:
    return Change(t, path, value, quality)


def events(out: list[Outgoing]) -> list[Change]:
    return [c for item in out if item.kind == "event" for c in item.changes]


def kinds(out: list[Outgoing]) -> list[str]:
    return [item.kind for item in out]


def started(paths=PATHS, initial: dict | None = None, t: float = T0, **config) -> PublishPolicy:
    """A policy that has seen (and sent) a first value of each signal in ``initial`` at ``t``."""
    policy = make(paths, **config)
    if initial:
        policy.observe([ch(t, p, v) for p, v in initial.items()])
    out = policy.due(t)
    assert {c.path: c.value for c in events(out)} == (initial or {})
    return policy


def step(policy: PublishPolicy, t: float, *changes: Change) -> list[Outgoing]:
    """One iteration of the daemon's loop: observe what changed at ``t``, then due(t)."""
    if changes:
        policy.observe(list(changes))
    return policy.due(t)


# -- first values, repeats ---------------------------------------------------------------------


def test_first_value_of_every_signal_goes_out_at_once():
    policy = make()
    first = [ch(T0, DOOR, False), ch(T0, WINDOW, 0), ch(T0, RANGE, 528_000), ch(T0, REL, 62.4),
             ch(T0, AIR, 18.5), ch(T0, MODE, "eco"), ch(T0, SEAT, 3), ch(T0, LOW, None, INVALID)]
    policy.observe(first)
    out = policy.due(T0)
    assert kinds(out) == ["event"]                 # one batch, no snapshot yet
    assert list(out[0].changes) == first           # the changes themselves, in order


def test_repeating_the_sent_value_sends_nothing():
    policy = started(initial={DOOR: False, RANGE: 528_000, MODE: "eco"})
    for k in range(1, 40):
        t = T0 + k * 0.5
        assert events(step(policy, t, ch(t, DOOR, False), ch(t, RANGE, 528_000),
                           ch(t, MODE, "eco"))) == []


# -- deadband ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1, -1])
def test_range_deadband_999_m_is_nothing_1000_m_is_an_event(sign):
    policy = started(initial={RANGE: 500_000})
    t = T0 + 20.0                                   # long past the minimum interval
    assert events(step(policy, t, ch(t, RANGE, 500_000 + sign * 999))) == []
    for later in (t + 1, t + 30):                   # not held for later either
        assert events(policy.due(later)) == []
    t += 40.0
    out = step(policy, t, ch(t, RANGE, 500_000 + sign * 1000))
    assert [(c.path, c.value) for c in events(out)] == [(RANGE, 500_000 + sign * 1000)]


def test_deadband_is_measured_from_the_value_sent_not_the_last_value_seen():
    policy = started(initial={RANGE: 500_000})
    t = T0 + 20.0
    # Creeping 250 m at a time: never 1000 m from the previous value, but the fourth step is
    # 1000 m from what was sent.
    for k, value in enumerate((500_250, 500_500, 500_750), start=1):
        assert events(step(policy, t + k, ch(t + k, RANGE, value))) == []
    out = step(policy, t + 4, ch(t + 4, RANGE, 501_000))
    assert [c.value for c in events(out)] == [501_000]


@pytest.mark.parametrize("path, base, inside, outside", [
    (REL, 50.0, 50.9, 51.0),          # fuel: 1 %
    (ABS, 30.0, 29.1, 29.0),          # fuel: 1 l
    (AIR, 18.0, 18.25, 18.5),         # air temperature: 0.5 degC
])
def test_default_deadbands_of_fuel_and_temperature(path, base, inside, outside):
    policy = started(initial={path: base})
    t = T0 + 20.0
    assert events(step(policy, t, ch(t, path, inside))) == []
    t += 20.0
    assert [c.value for c in events(step(policy, t, ch(t, path, outside)))] == [outside]


def test_signal_without_deadband_goes_out_on_any_move():
    policy = started(initial={SEAT: 3})
    t = T0 + 20.0
    assert [c.value for c in events(step(policy, t, ch(t, SEAT, 4)))] == [4]


@pytest.mark.parametrize("path, base, moved", [(REL, 0.4, 1.4), (REL, 3.1, 4.1),
                                               (AIR, -4.1, -3.6)])
def test_a_move_of_exactly_the_deadband_between_decimal_values_goes_out(path, base, moved):
    policy = started(initial={path: base})
    t = T0 + 20.0
    assert [c.value for c in events(step(policy, t, ch(t, path, moved)))] == [moved]


# -- minimum interval --------------------------------------------------------------------------


def test_change_within_min_interval_is_held_and_released_with_the_latest_value():
    policy = started(initial={RANGE: 500_000})           # sent at T0
    out = []
    for k in range(1, 100):                              # due() every 0.1 s up to T0 + 9.9
        t = T0 + k * 0.1
        changes = []
        if k == 20:
            changes = [ch(t, RANGE, 501_000)]            # qualifies, but within 10 s: held
        elif k == 50:
            changes = [ch(t, RANGE, 502_500)]            # a later qualifying value replaces it
        out += step(policy, t, *changes)
    assert events(out) == []
    assert policy.counters.held == 2
    released = policy.due(T0 + 10.0)                     # the interval since T0 has passed
    assert [(c.path, c.value) for c in events(released)] == [(RANGE, 502_500)]
    assert events(policy.due(T0 + 10.1)) == []           # released once


def test_held_value_dropped_when_the_signal_returns_within_the_deadband():
    policy = started(initial={RANGE: 500_000})
    step(policy, T0 + 2, ch(T0 + 2, RANGE, 501_500))     # held
    step(policy, T0 + 3, ch(T0 + 3, RANGE, 500_200))     # back within 1000 m of what was sent
    assert events(policy.due(T0 + 10)) == []
    assert events(policy.due(T0 + 30)) == []


def test_change_after_min_interval_goes_out_at_once():
    policy = started(initial={RANGE: 500_000})
    t = T0 + 10.0
    assert [c.value for c in events(step(policy, t, ch(t, RANGE, 499_000)))] == [499_000]


def test_min_interval_zero_sends_every_qualifying_change():
    policy = started(initial={RANGE: 500_000}, min_interval_s=0.0)
    out = []
    for k in range(1, 6):
        t = T0 + k * 0.5
        out += step(policy, t, ch(t, RANGE, 500_000 + 1000 * k))
    assert [c.value for c in events(out)] == [501_000, 502_000, 503_000, 504_000, 505_000]


def test_min_interval_holds_after_a_held_value_was_released():
    policy = started(initial={RANGE: 500_000})           # sent at T0
    sent_at = [T0]
    for k in range(1, 400):                              # 40 s, due() every 0.1 s
        t = T0 + k * 0.1
        changes = []
        if k == 10:
            changes = [ch(t, RANGE, 501_000)]            # T0+1: held until T0+10
        elif k == 110:
            changes = [ch(t, RANGE, 502_000)]            # T0+11: 1 s after the release
        for c in events(step(policy, t, *changes)):
            sent_at.append(t)
    assert len(sent_at) == 3
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    assert all(gap >= 10.0 - 1e-6 for gap in gaps), sent_at


# -- immediate signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("path, values", [
    (DOOR, [True, False, True, False]),
    (IS_LOCKED[0], [False, True, False]),
    (TRUNK, [True, False]),
    (HOOD, [True, False]),
    (LOW, [True, False]),
    (WINDOW, [1, 2, 5, 40, 39, 10]),
    (SUNROOF, [10, 20, 30]),
])
def test_immediate_signals_go_out_on_the_next_due_every_time(path, values):
    initial = {path: (not values[0]) if isinstance(values[0], bool) else 0}
    policy = started(initial=initial)
    for k, value in enumerate(values, start=1):
        t = T0 + k * 0.5                                # inside every interval, under the cap
        out = step(policy, t, ch(t, path, value))
        assert [(c.path, c.value) for c in events(out)] == [(path, value)], (k, value)


def test_default_immediate_patterns_cover_doors_locks_windows_lids():
    policy = make()
    immediate = {p for p, flag in zip(PATHS, policy.immediate) if flag}
    assert immediate == {DOOR, IS_OPEN[1], IS_LOCKED[0], TRUNK, HOOD, WINDOW, WINDOWS[1],
                         SUNROOF, LOW}
    assert policy.deadband[PATHS.index(RANGE)] == 1000.0
    assert policy.deadband[PATHS.index(REL)] == 1.0
    assert dict(DEFAULT_DEADBANDS)[RANGE] == 1000.0


def test_string_signals_go_out_on_every_change():
    policy = started(initial={MODE: "eco"})
    out = []
    for k, mode in enumerate(["sport", "eco", "comfort"], start=1):
        t = T0 + k * 0.5
        out += step(policy, t, ch(t, MODE, mode))
    assert [c.value for c in events(out)] == ["sport", "eco", "comfort"]


# -- quality -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, value", [(RANGE, 528_000), (REL, 62.4), (DOOR, False),
                                         (WINDOW, 10)])
@pytest.mark.parametrize("bad", [INVALID, STALE])
def test_quality_changes_always_go_out(path, value, bad):
    policy = started(initial={path: value})
    sequence = [(None, bad), (value, VALID), (None, bad), (value, VALID)]
    out = []
    for k, (v, q) in enumerate(sequence, start=1):
        t = T0 + k * 0.5                               # all within min_interval_s
        out += step(policy, t, ch(t, path, v, q))
    assert [(c.value, c.quality) for c in events(out)] == sequence


def test_invalid_to_stale_is_a_quality_change():
    policy = started(initial={RANGE: 528_000})
    out = step(policy, T0 + 1, ch(T0 + 1, RANGE, None, INVALID))
    out += step(policy, T0 + 2, ch(T0 + 2, RANGE, None, STALE))
    assert [c.quality for c in events(out)] == [INVALID, STALE]


def test_quality_change_supersedes_a_held_value():
    policy = started(initial={RANGE: 500_000})
    step(policy, T0 + 1, ch(T0 + 1, RANGE, 502_000))           # held
    out = step(policy, T0 + 2, ch(T0 + 2, RANGE, None, INVALID))
    assert [(c.value, c.quality) for c in events(out)] == [(None, INVALID)]
    assert events(policy.due(T0 + 30)) == []                  # the held value is gone


# -- snapshots -------------------------------------------------------------------------------------


def snapshot_times(policy: PublishPolicy, start: float, end: float, dt: float,
                   change_every: int = 0) -> list[float]:
    """Drive due() from start to end; toggle a door every ``change_every`` steps."""
    times = []
    n = round((end - start) / dt)
    for k in range(1, n + 1):
        t = start + k * dt
        changes = [ch(t, DOOR, k % 2 == 0)] if change_every and k % change_every == 0 else []
        times += [t for item in step(policy, t, *changes) if item.kind == "state"]
    return times


def test_first_snapshot_not_before_the_state_had_time_to_fill():
    policy = make(snapshot_min_interval_s=5.0, max_messages_per_s=100.0)
    out = []
    for k in range(0, 50):                                   # T0 .. T0 + 4.9
        t = T0 + k * 0.1
        out += step(policy, t, ch(t, DOOR, k % 2 == 0), ch(t, RANGE, 500_000 + 1000 * k))
    assert "state" not in kinds(out)
    assert kinds(policy.due(T0 + 5.0)).count("state") == 1


def test_snapshot_on_change_at_most_every_snapshot_min_interval():
    policy = make(snapshot_min_interval_s=5.0, heartbeat_s=600.0, max_messages_per_s=1000.0)
    step(policy, T0, ch(T0, DOOR, False))
    times = snapshot_times(policy, T0, T0 + 60.0, 0.1, change_every=3)
    assert times, "changes every 0.3 s must produce snapshots"
    assert times[0] >= T0 + 5.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(gap >= 5.0 - 1e-6 for gap in gaps), gaps
    assert all(gap <= 5.0 + 0.3 + 1e-6 for gap in gaps), gaps   # and they do come
    assert len(times) >= 10


def test_no_snapshot_on_change_without_changes():
    policy = make(snapshot_min_interval_s=5.0, heartbeat_s=600.0)
    step(policy, T0, ch(T0, DOOR, False))
    assert snapshot_times(policy, T0, T0 + 5.0, 0.5) == [T0 + 5.0]    # after the first values
    assert snapshot_times(policy, T0 + 5.0, T0 + 300.0, 0.5) == []    # nothing changed since


def test_heartbeat_every_heartbeat_s_without_changes():
    policy = make(snapshot_min_interval_s=5.0, heartbeat_s=60.0)
    assert kinds(policy.due(T0)) == []
    times = snapshot_times(policy, T0, T0 + 250.0, 1.0)
    assert times == [T0 + 60.0, T0 + 120.0, T0 + 180.0, T0 + 240.0]


def test_heartbeat_counts_from_the_last_snapshot():
    policy = make(snapshot_min_interval_s=5.0, heartbeat_s=60.0)
    step(policy, T0, ch(T0, DOOR, False))
    times = snapshot_times(policy, T0, T0 + 200.0, 1.0)
    assert times == [T0 + 5.0, T0 + 65.0, T0 + 125.0, T0 + 185.0]
    assert policy.counters.snapshots == 4


def test_heartbeat_is_not_starved_by_an_event_backlog():
    policy = make(paths=(DOOR,), max_messages_per_s=5.0, heartbeat_s=2.0,
                  snapshot_min_interval_s=1.0)
    policy.due(0.0)
    times = []
    for k in range(1, 1001):                                 # 100 toggles/s for 10 s
        t = k * 0.01
        times += [t for item in step(policy, t, ch(t, DOOR, k % 2 == 0)) if item.kind == "state"]
    assert len(times) >= 4, times                           # ~ every 2 s


# -- rate cap under a flood --------------------------------------------------------------------------

FLOOD_PATHS = (DOOR, IS_OPEN[1], WINDOW, WINDOWS[1], RANGE)


def flood(policy: PublishPolicy, n: int = 1000, duration: float = 10.0):
    """n steps over ``duration`` s: two doors toggling, two windows moving, every step."""
    inputs: dict[str, list] = defaultdict(list)
    emitted: list[tuple[float, Outgoing]] = []
    t = 0.0
    policy.due(t)
    for k in range(1, n + 1):
        t = k * duration / n
        changes = [ch(t, DOOR, k % 2 == 1), ch(t, IS_OPEN[1], k % 3 == 0 if k % 2 else k % 5 == 0),
                   ch(t, WINDOW, k % 101), ch(t, WINDOWS[1], (7 * k) % 100)]
        fresh = []
        for c in changes:
            seen = inputs[c.path]
            if not seen or seen[-1] != c.value:          # a pipeline reports changes only
                seen.append(c.value)
                fresh.append(c)
        emitted += [(t, item) for item in step(policy, t, *fresh)]
    return inputs, emitted, t


def per_signal(items) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for item in items:
        if item.kind == "event":
            paths = [c.path for c in item.changes]
            assert len(paths) == len(set(paths)), "a batch must hold a signal at most once"
            for c in item.changes:
                out[c.path].append(c.value)
    return out


def test_flood_messages_per_second_of_source_time_capped():
    cap = 5.0
    policy = make(FLOOD_PATHS, max_messages_per_s=cap)
    _, emitted, _ = flood(policy)
    times = [t for t, _ in emitted]
    worst = max(sum(1 for u in times if s <= u < s + 1.0) for s in times)
    assert worst == cap, worst                              # never more, and the cap is used


def test_flood_long_run_rate_respects_the_cap():
    cap = 5.0
    policy = make(FLOOD_PATHS, max_messages_per_s=cap)
    _, emitted, end = flood(policy)
    times = [t for t, _ in emitted]
    # token bucket: in any window of w seconds at most (bucket size + cap * w) messages
    for start in times:
        for w in (1.0, 2.0, 5.0, 10.0):
            count = sum(1 for u in times if start <= u < start + w)
            assert count <= max(1.0, cap) + cap * w, (start, w, count)
    assert len(times) <= cap * end + max(1.0, cap)
    assert len(times) >= cap * end - 1                      # and the cap is actually used


def test_flood_drops_nothing_batches_replay_every_change_in_order():
    policy = make(FLOOD_PATHS, max_messages_per_s=5.0)
    inputs, emitted, end = flood(policy)
    assert policy.counters.coalesced == 0
    assert len(policy.batches) > 100                         # really a backlog
    items = [item for _, item in emitted] + policy.flush(end)
    replay = per_signal(items)
    for path in (DOOR, IS_OPEN[1], WINDOW, WINDOWS[1]):
        assert replay[path] == inputs[path], path
    assert sum(len(v) for v in inputs.values()) > 2500     # every one of them is there
    assert kinds(items).count("event") == policy.counters.events


def test_flush_emits_everything_pending_and_a_final_snapshot_regardless_of_the_cap():
    policy = make(FLOOD_PATHS, max_messages_per_s=5.0)
    inputs, emitted, end = flood(policy, n=200, duration=2.0)
    policy.observe([ch(end, RANGE, 500_000)])
    policy.due(end)
    policy.observe([ch(end + 0.01, RANGE, 502_000)])       # held (min interval)
    pending = len(policy.batches)
    assert pending > 5 and policy.held
    assert len(policy.sent_times) == 5 and end - policy.sent_times[0] < 1.0   # the cap is reached
    out = policy.flush(end + 0.02)                          # no time for tokens to refill
    assert kinds(out)[-1] == "state"
    assert kinds(out)[:-1] == ["event"] * (len(out) - 1)
    assert len(out) - 1 in (pending, pending + 1)           # + a batch for the held value
    replay = per_signal([item for _, item in emitted] + out)
    for path in (DOOR, IS_OPEN[1], WINDOW, WINDOWS[1]):
        assert replay[path] == inputs[path], path
    assert replay[RANGE] == [500_000, 502_000]              # held value released too
    assert not policy.batches and not policy.held
    assert [item.kind for item in policy.due(end + 0.03)] == []   # nothing left over


def test_flush_with_nothing_pending_is_one_snapshot():
    policy = started(initial={DOOR: False})
    out = policy.flush(T0 + 0.5)
    assert kinds(out) == ["state"]


def test_max_pending_batches_bound_coalesces_and_counts_every_collapsed_change():
    policy = make((DOOR, WINDOW), max_messages_per_s=0.1, max_pending_batches=3)
    policy.due(0.0)
    doors = [k % 2 == 0 for k in range(1, 11)]              # F T F T ... 10 toggles
    windows = list(range(1, 11))
    for k in range(10):
        t = 0.01 * (k + 1)
        policy.observe([ch(t, DOOR, doors[k]), ch(t, WINDOW, windows[k])])
        assert len(policy.batches) <= 3
    out = policy.flush(0.2)
    replay = per_signal(out)
    emitted = sum(len(v) for v in replay.values())
    assert emitted + policy.counters.coalesced == len(doors) + len(windows)
    assert policy.counters.coalesced == 14                  # 3 batches kept, 7 x 2 collapsed
    assert replay[DOOR] == doors[:2] + [doors[-1]]          # order kept, the newest wins
    assert replay[WINDOW] == windows[:2] + [windows[-1]]


def test_below_the_bound_nothing_is_coalesced():
    policy = make((DOOR,), max_messages_per_s=0.1, max_pending_batches=50)
    policy.due(0.0)
    values = [k % 2 == 1 for k in range(50)]
    for k, v in enumerate(values):
        policy.observe([ch(0.01 * (k + 1), DOOR, v)])
    assert policy.counters.coalesced == 0
    assert per_signal(policy.flush(1.0))[DOOR] == values


# -- property: random change streams ----------------------------------------------------------------

PROP_PATHS = (DOOR, WINDOW, MODE, RANGE, AIR, SEAT)
IMMEDIATE_LIKE = {DOOR, WINDOW, MODE}        # every change goes out (immediate, non-numeric)
BANDS = {RANGE: 1000.0, AIR: 0.5, SEAT: 0.0}
VALUES = {
    DOOR: st.booleans(),
    WINDOW: st.integers(0, 100),
    MODE: st.sampled_from(["eco", "sport", "comfort"]),
    RANGE: st.integers(0, 20).map(lambda k: k * 500),
    AIR: st.sampled_from([17.0, 17.25, 17.5, 18.0, 18.75, 19.5]),
    SEAT: st.integers(0, 5),
}


@st.composite
def change_streams(draw):
    steps = draw(st.lists(st.tuples(
        st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0, 7.0, 15.0]),   # time step
        st.sampled_from(PROP_PATHS),
        st.data(),
        st.sampled_from([VALID] * 6 + [INVALID, STALE]),
        st.booleans(),                                           # call due() after it
    ), min_size=1, max_size=120))
    return [(dt, path, None if q != VALID else data.draw(VALUES[path]), q, tick)
            for dt, path, data, q, tick in steps]


def is_subsequence(sub: list, seq: list) -> bool:
    it = iter(seq)
    return all(any(x == y and type(x) is type(y) for y in it) for x in sub)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=change_streams(),
       cap=st.sampled_from([0.5, 1.0, 5.0, 100.0]),
       min_interval=st.sampled_from([0.0, 1.0, 10.0]))
def test_property_emitted_batches_are_an_order_preserving_record(stream, cap, min_interval):
    policy = make(PROP_PATHS, max_messages_per_s=cap, min_interval_s=min_interval,
                  max_pending_batches=10**6)
    inputs: dict[str, list] = defaultdict(list)
    out: list[Outgoing] = []
    t = T0
    for dt, path, value, quality, tick in stream:
        t += dt
        seen = inputs[path]
        if seen and seen[-1] == (value, quality) and type(seen[-1][0]) is type(value):
            continue                                   # the pipeline reports changes only
        seen.append((value, quality))
        policy.observe([ch(t, path, value, quality)])
        if tick:
            out += policy.due(t)
    out += policy.flush(t + 0.001)
    assert out[-1].kind == "state"
    assert policy.counters.coalesced == 0
    emitted: dict[str, list] = defaultdict(list)
    for item in out:
        if item.kind == "event":
            batch = [c.path for c in item.changes]
            assert len(batch) == len(set(batch))
            for c in item.changes:
                emitted[c.path].append((c.value, c.quality))
    for path, seq in inputs.items():
        got = emitted[path]
        assert got, path                                  # the first value always goes out
        assert got[0] == seq[0]
        assert is_subsequence(got, seq), (path, got, seq)
        if path in IMMEDIATE_LIKE:
            assert got == seq, path
        last_v, last_q = seq[-1]
        sent_v, sent_q = got[-1]
        if path in IMMEDIATE_LIKE or last_q != VALID or BANDS[path] == 0.0:
            assert (sent_v, sent_q) == (last_v, last_q), path
        else:                                             # deadband: within it of the truth
            assert sent_q == VALID and abs(sent_v - last_v) < BANDS[path], (path, got, seq)


@settings(max_examples=150, deadline=None)
@given(toggles=st.lists(st.tuples(st.sampled_from([DOOR, WINDOW]), st.integers(0, 3)),
                        min_size=1, max_size=80),
       bound=st.integers(1, 6))
def test_property_coalesced_counts_exactly_what_the_bound_collapsed(toggles, bound):
    policy = make((DOOR, WINDOW), max_messages_per_s=0.1, max_pending_batches=bound)
    policy.due(0.0)
    last: dict[str, object] = {}
    n = 0
    for k, (path, raw) in enumerate(toggles, start=1):
        value = bool(raw % 2) if path == DOOR else raw
        if path in last and last[path] == value:
            continue
        last[path] = value
        n += 1
        policy.observe([ch(k * 0.001, path, value)])
        assert len(policy.batches) <= bound
    out = policy.flush(1.0)
    replay = per_signal(out)
    assert sum(len(v) for v in replay.values()) + policy.counters.coalesced == n
    for path, value in last.items():
        assert replay[path][-1] == value


# -- config: the `policy:` section -------------------------------------------------------------------

BASE = "vehicle_id: VIN1\ndbc: [vehicle.dbc]\nmapping: mapping.yaml\n"


def load_policy(tmp_path: Path, section: str) -> PolicyConfig:
    return load_config(write(tmp_path / "agent.yaml", BASE + section)).policy


def policy_error(tmp_path: Path, section: str) -> str:
    path = write(tmp_path / "agent.yaml", BASE + section)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert one_line(message) and message.startswith(f"{path}:"), message
    return message


def test_config_without_policy_gives_the_defaults(tmp_path):
    policy = load_policy(tmp_path, "")
    assert policy == PolicyConfig()
    assert policy.immediate == DEFAULT_IMMEDIATE
    assert dict(policy.deadband) == {
        "Vehicle.Powertrain.FuelSystem.RelativeLevel": 1.0,
        "Vehicle.Powertrain.FuelSystem.AbsoluteLevel": 1.0,
        "Vehicle.Powertrain.FuelSystem.Range": 1000.0,
        "Vehicle.Exterior.AirTemperature": 0.5,
    }
    assert (policy.min_interval_s, policy.snapshot_min_interval_s, policy.heartbeat_s,
            policy.max_messages_per_s, policy.max_pending_batches) == (10.0, 5.0, 60.0, 5.0, 1000)


def test_empty_policy_section_gives_the_defaults(tmp_path):
    assert load_policy(tmp_path, "policy: {}\n") == PolicyConfig()
    assert load_policy(tmp_path, "policy:\n") == PolicyConfig()


def test_policy_overrides(tmp_path):
    policy = load_policy(tmp_path, """\
policy:
  immediate: ["*.IsOpen", "Vehicle.Cabin.Sunroof.*"]
  deadband: {Vehicle.Powertrain.FuelSystem.Range: 500, "*.Window.Position": 2.5}
  min_interval_s: 0
  snapshot_min_interval_s: 0.5
  heartbeat_s: 30
  max_messages_per_s: 0.5
  max_pending_batches: 7
""")
    assert policy == PolicyConfig(
        immediate=("*.IsOpen", "Vehicle.Cabin.Sunroof.*"),
        deadband=(("Vehicle.Powertrain.FuelSystem.Range", 500.0), ("*.Window.Position", 2.5)),
        min_interval_s=0.0, snapshot_min_interval_s=0.5, heartbeat_s=30.0,
        max_messages_per_s=0.5, max_pending_batches=7)
    assert all(isinstance(band, float) for _, band in policy.deadband)
    assert isinstance(policy.heartbeat_s, float) and isinstance(policy.min_interval_s, float)


def test_policy_from_config_drives_the_policy(tmp_path):
    config = load_policy(tmp_path, "policy: {deadband: {Vehicle.Powertrain.FuelSystem.Range: "
                                   "250}, min_interval_s: 0}\n")
    policy = PublishPolicy((RANGE,), config)
    step(policy, T0, ch(T0, RANGE, 500_000))
    assert events(step(policy, T0 + 1, ch(T0 + 1, RANGE, 500_200))) == []
    assert [c.value for c in events(step(policy, T0 + 2, ch(T0 + 2, RANGE, 500_250)))] \
        == [500_250]


@pytest.mark.parametrize("section, key", [
    ("policy: {max_messages_per_s: 0}\n", "policy.max_messages_per_s"),
    ("policy: {max_messages_per_s: -5}\n", "policy.max_messages_per_s"),
    ("policy: {max_messages_per_s: fast}\n", "policy.max_messages_per_s"),
    ("policy: {heartbeat_s: 0.5}\n", "policy.heartbeat_s"),
    ("policy: {min_interval_s: -1}\n", "policy.min_interval_s"),
    ("policy: {snapshot_min_interval_s: true}\n", "policy.snapshot_min_interval_s"),
    ("policy: {max_pending_batches: 0}\n", "policy.max_pending_batches"),
    ("policy: {max_pending_batches: 2.5}\n", "policy.max_pending_batches"),
    ("policy: {heartbeat_s: .inf}\n", "policy.heartbeat_s"),
    ("policy: {burst: 3}\n", "policy.burst"),
    ("policy: {deadband: {Vehicle.Powertrain.FuelSystem.Range: lots}}\n",
     "policy.deadband.Vehicle.Powertrain.FuelSystem.Range"),
    ("policy: {deadband: {Vehicle.Powertrain.FuelSystem.Range: -1}}\n",
     "policy.deadband.Vehicle.Powertrain.FuelSystem.Range"),
    ("policy: {deadband: [1, 2]}\n", "policy.deadband"),
    ("policy: {immediate: \"*.IsOpen\"}\n", "policy.immediate"),
    ("policy: {immediate: [\"*.IsOpen\", 3]}\n", "policy.immediate"),
    ("policy: [1, 2]\n", "policy"),
])
def test_policy_errors_name_the_key(tmp_path, section, key):
    message = policy_error(tmp_path, section)
    assert f": {key}:" in message, message


def test_unknown_policy_key_lists_the_known_ones(tmp_path):
    message = policy_error(tmp_path, "policy: {max_msgs_per_s: 5}\n")
    assert "policy.max_msgs_per_s: unknown key" in message
    assert "max_messages_per_s" in message


def test_readme_documents_the_policy_keys():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "## Publish policy" in readme or "### Publish policy" in readme
    for key in ("immediate", "deadband", "min_interval_s", "snapshot_min_interval_s",
                "heartbeat_s", "max_messages_per_s", "max_pending_batches"):
        assert key in readme, key


# -- overlapping deadband patterns: the first match wins --------------------------------------


@pytest.mark.parametrize("bands, inside, outside", [
    # The specific pattern first: its 100 m band applies, not the catch-all's 5000 m.
    ((("*.FuelSystem.Range", 100.0), ("Vehicle.*", 5000.0)), 99, 100),
    # The catch-all first: it shadows the specific pattern written after it.
    ((("Vehicle.*", 5000.0), ("*.FuelSystem.Range", 100.0)), 4999, 5000),
])
def test_first_matching_deadband_pattern_wins(bands, inside, outside):
    policy = started(paths=(RANGE,), initial={RANGE: 500_000}, deadband=bands)
    t = T0 + 20.0
    assert events(step(policy, t, ch(t, RANGE, 500_000 + inside))) == []
    t += 20.0
    out = step(policy, t, ch(t, RANGE, 500_000 + outside))
    assert [c.value for c in events(out)] == [500_000 + outside]


def test_deadband_patterns_keep_the_order_written_in_the_config(tmp_path):
    config = load_policy(tmp_path, "policy:\n  min_interval_s: 0\n  deadband:\n"
                                   "    Vehicle.*: 5000\n    '*.FuelSystem.Range': 100\n")
    assert config.deadband == (("Vehicle.*", 5000.0), ("*.FuelSystem.Range", 100.0))
    policy = PublishPolicy((RANGE,), config)
    step(policy, T0, ch(T0, RANGE, 500_000))
    t = T0 + 1.0
    assert events(step(policy, t, ch(t, RANGE, 504_999))) == []
    assert [c.value for c in events(step(policy, t + 1, ch(t + 1, RANGE, 505_000)))] == [505_000]


# -- the rate cap's window: at most N messages in any one second ---------------------------------


def test_a_long_silence_allows_a_burst_of_the_cap_then_one_second_of_waiting():
    policy = started(paths=(DOOR,), initial={DOOR: False}, max_messages_per_s=3.0,
                     snapshot_min_interval_s=1000.0, heartbeat_s=1000.0)
    t = T0 + 100.0                                   # 100 s without a message
    # Five changes of one signal at one instant: five batches (no state is dropped).
    policy.observe([ch(t, DOOR, v) for v in (True, False, True, False, True)])
    assert [[c.value for c in item.changes] for item in policy.due(t)] == [[True], [False], [True]]
    assert policy.due(t + 0.999) == []               # three went in this second
    assert [[c.value for c in item.changes] for item in policy.due(t + 1.0)] == [[False], [True]]


def test_a_door_event_is_not_held_behind_a_snapshot_that_just_went():
    policy = started(paths=(DOOR,), initial={DOOR: False}, max_messages_per_s=5.0,
                     snapshot_min_interval_s=1.0, heartbeat_s=1000.0)
    t = T0 + 10.0
    policy.observe([ch(t, DOOR, True)])
    assert kinds(policy.due(t)) == ["event", "state"]   # the change, then a snapshot
    policy.observe([ch(t + 0.001, DOOR, False)])
    assert [[c.value for c in item.changes] for item in policy.due(t + 0.001)] == [[False]]


def test_below_one_per_second_one_message_per_period():
    policy = started(paths=(DOOR,), initial={DOOR: False}, max_messages_per_s=0.5,
                     snapshot_min_interval_s=1000.0, heartbeat_s=1000.0)
    t = T0 + 100.0
    policy.observe([ch(t, DOOR, True), ch(t, DOOR, False)])
    assert len(policy.due(t)) == 1
    assert policy.due(t + 1.999) == []
    assert len(policy.due(t + 2.0)) == 1
