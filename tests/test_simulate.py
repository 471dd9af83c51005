"""agent.dev.simulate: a deterministic simulated drive that decodes into the scenario it describes."""

from __future__ import annotations

import io
import re
from collections import Counter

import cantools
import pytest

from agent.can.capture import open_capture
from agent.signals.model import INVALID, STALE, VALID
from agent.dev.simulate import EPOCH, generate, scenario, write_capture
from agent.signals.state import SignalPipeline
from coredata import (ALL_DEMO_PATHS, BODY_ID, CLUSTER_ID, DEMO_DBC, IS_LOCKED, IS_OPEN, RANGE,
                      REL, TRUNK, WINDOWS, demo_vehicle, write)

DURATION = 120.0


def capture_text(duration: float, seed: int, **kw) -> str:
    out = io.StringIO()
    count = write_capture(demo_vehicle(), out, duration, seed, **kw)
    text = out.getvalue()
    assert text.count("\n") == count
    return text


# -- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_output():
    assert capture_text(3.0, 7) == capture_text(3.0, 7)


def test_different_seed_gives_different_output():
    a, b = capture_text(3.0, 1), capture_text(3.0, 2)
    assert a != b
    assert abs(a.count("\n") - b.count("\n")) < 100      # same drive, same bus load


def test_capture_starts_at_the_fixed_epoch_and_is_time_ordered(tmp_path):
    path = write(tmp_path / "sim.log", capture_text(2.0, 1))
    with open_capture(path) as reader:
        stamps = [m.timestamp for m in reader]
    assert reader.malformed == 0 and reader.format == "candump"
    assert EPOCH <= stamps[0] < EPOCH + 0.02
    assert stamps[-1] < EPOCH + 2.0 + 0.001
    # in time order (a few consecutive frames share a microsecond after rounding)
    assert all(b >= a for a, b in zip(stamps, stamps[1:]))
    assert len(set(stamps)) > 0.99 * len(stamps)


def test_channel_defaults_to_the_config_and_can_be_given():
    default = next(iter(generate(demo_vehicle(), 0.5)))
    assert default.channel == "vcan0"
    named = capture_text(0.5, 1, channel="can3")
    assert {line.split()[1] for line in named.splitlines()} == {"can3"}


def test_write_capture_to_a_path(tmp_path):
    path = tmp_path / "sim.log"
    count = write_capture(demo_vehicle(), path, 1.0, seed=3)
    assert path.read_text() == capture_text(1.0, 3) and 1800 <= count <= 2200


def test_scenario_values_are_the_documented_drive():
    start, mid, end = scenario(0.0, 100.0), scenario(46.0, 100.0), scenario(95.0, 100.0)
    assert start[REL] == 62.4 and start[IS_OPEN[0]] is False and start[IS_LOCKED[0]] is True
    assert mid[RANGE] is None                                   # 0.45 <= f < 0.47
    assert end[IS_OPEN[0]] is True and end[TRUNK] is True and end[IS_LOCKED[0]] is False
    assert scenario(50.0, 100.0)[WINDOWS[0]] == 40.0


# -- a 120 s drive decoded through the pipeline ------------------------------------------------


@pytest.fixture(scope="module")
def drive():
    """One pass over a 120 s simulated drive: changes, counters and per-frame checks."""
    vehicle = demo_vehicle()
    pipeline = SignalPipeline(vehicle.decoder())
    per_second = Counter()
    bad_checksums = []
    counters = {CLUSTER_ID: [], BODY_ID: []}
    frames = 0
    changes = []
    for msg in generate(vehicle, DURATION, seed=1):
        frames += 1
        per_second[int(msg.timestamp - EPOCH)] += 1
        if msg.arbitration_id in counters and not msg.is_extended_id:
            data = bytes(msg.data)
            if data[7] != (sum(data[:7]) + (msg.arbitration_id & 0xFF)) & 0xFF:
                bad_checksums.append((msg.timestamp, hex(msg.arbitration_id), data.hex()))
            counters[msg.arbitration_id].append(
                data[6] >> 4 if msg.arbitration_id == CLUSTER_ID else data[6] & 0xF)
        changes.extend(pipeline.feed(msg))
    return {"frames": frames, "changes": changes, "per_second": per_second,
            "bad_checksums": bad_checksums, "counters": counters,
            "decoder": pipeline.decoder.counters}


def series(drive, path, quality=VALID):
    return [c.value for c in drive["changes"] if c.path == path and c.quality == quality]


def test_every_mapped_path_is_published_valid(drive):
    valid = {c.path for c in drive["changes"] if c.quality == VALID}
    assert valid == set(ALL_DEMO_PATHS)


def test_no_signal_goes_stale_and_nothing_is_malformed(drive):
    assert not [c for c in drive["changes"] if c.quality == STALE]
    c = drive["decoder"]
    assert (c.wrong_length, c.undecodable, c.error_frames, c.remote_frames) == (0, 0, 0, 0)
    assert c.frames == drive["frames"] and c.decoded > 4000 and c.unmapped > 200_000


def test_booleans_are_booleans(drive):
    for c in drive["changes"]:
        if c.path.endswith((".IsOpen", ".IsLocked", ".IsFuelLevelLow")) and c.quality == VALID:
            assert type(c.value) is bool, c


def test_levels_and_positions_are_percentages(drive):
    for path in [REL] + WINDOWS:
        values = series(drive, path)
        assert values and all(0 <= v <= 100 for v in values), path


def test_fuel_level_decreases_over_the_drive(drive):
    levels = series(drive, REL)
    assert levels[0] == 62.4 and levels[-1] < levels[0] - 5
    assert all(b < a for a, b in zip(levels, levels[1:]))


def test_driver_door_opens_and_closes(drive):
    assert series(drive, IS_OPEN[0]) == [False, True, False, True]
    assert series(drive, IS_OPEN[1]) == [False]


def test_locks_unlock_lock_unlock(drive):
    for path in IS_LOCKED:
        assert series(drive, path) == [True, False, True, False]


def test_driver_window_moves(drive):
    positions = series(drive, WINDOWS[0])
    assert positions[0] == 0 and max(positions) == 40 and positions[-1] == 10
    assert len(set(positions)) > 30
    assert series(drive, WINDOWS[1]) == [0]


def test_trunk_opens(drive):
    assert series(drive, TRUNK) == [False, True]


def test_range_has_an_invalid_episode_and_recovers(drive):
    qualities = [(c.t - EPOCH, c.quality) for c in drive["changes"] if c.path == RANGE]
    invalid = [t for t, q in qualities if q == INVALID]
    assert len(invalid) == 1 and 0.45 * DURATION <= invalid[0] < 0.47 * DURATION
    after = [q for t, q in qualities if t > invalid[0]]
    assert after and after[0] == VALID
    assert all(v % 1000 == 0 for v in series(drive, RANGE))      # whole km in metres


def test_bus_load_is_about_2000_frames_per_second(drive):
    assert 1800 * DURATION <= drive["frames"] <= 2200 * DURATION
    full_seconds = [drive["per_second"][s] for s in range(int(DURATION))]
    assert min(full_seconds) >= 1800 and max(full_seconds) <= 2200


def test_checksums_follow_the_rule_in_the_dbc_comment(drive):
    db = cantools.database.load_file(DEMO_DBC)
    rule = "Checksum = (sum of bytes 0..6 + low byte of the frame id) & 0xFF."
    for name in ("Cluster", "BodyStatus"):
        assert rule in db.get_message_by_name(name).comment
    assert len(drive["counters"][CLUSTER_ID]) == pytest.approx(10 * DURATION, abs=2)
    assert drive["bad_checksums"] == []


def test_counters_count_modulo_16(drive):
    for seq in drive["counters"].values():
        assert all(b == (a + 1) % 16 for a, b in zip(seq, seq[1:]))


def test_simulated_file_decodes_like_the_stream(tmp_path, drive):
    # the candump text of the same drive, read back, gives the same first changes
    path = write(tmp_path / "sim.log", capture_text(10.0, 1))
    with open_capture(path) as reader:
        changes = list(SignalPipeline(demo_vehicle().decoder()).run(reader))
    assert re.fullmatch(r"\d+\.\d+", f"{changes[0].t:.6f}")
    first_rel = next(c for c in changes if c.path == REL)
    assert (first_rel.value, first_rel.quality) == (62.4, VALID)
    assert {c.path for c in changes if c.quality == VALID} == set(ALL_DEMO_PATHS)
