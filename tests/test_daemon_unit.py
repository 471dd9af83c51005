"""agent.service.daemon in-process, with no broker: a capture replayed as fast as possible, MQTT pointed at
a loopback port where nothing listens. Every signed message must stay in the outbox, in order,
verifiable, and saying what an offline decode of the same capture says.

Both runs of the agent happen once per module (they take ~1 s each: the drain timeout); the
tests below inspect what they left behind. The outbox is inspected on a *copy* of the store,
because opening an Outbox counts as a boot.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.can.capture import open_capture
from agent.service.daemon import Agent, run
from agent.errors import ConfigError, KeyFileError
from agent.uplink.outbox import Entry, Outbox
from agent.dev.broker import free_port
from agent.dev.pki import init_pki
from agent.config import PolicyConfig
from agent.signals.policy import PublishPolicy
from agent.signals.model import STALE, VALID
from agent.uplink.signing import Verifier
from agent.dev.simulate import write_capture
from agent.signals.state import SignalPipeline, VehicleState
from agent.signals.vehicle import load_vehicle
from coredata import (DEMO_CONFIG, IS_LOCKED, IS_OPEN, RANGE, REL, TRUNK,
                      WINDOWS)
from support.agent_run import write_agent_config
from support.handdecode import final_values

VID = "VIN1"
EVENTS = f"vehicles/{VID}/events"
STATE = f"vehicles/{VID}/state"
IMMEDIATE = set(IS_OPEN) | set(IS_LOCKED) | set(WINDOWS) | {
    "Vehicle.Body.Trunk.Rear.IsOpen", "Vehicle.Body.Hood.IsOpen",
    "Vehicle.Powertrain.FuelSystem.IsFuelLevelLow"}
# More than one snapshot in a 5 s drive, so state entries are checked beyond the final one.
POLICY = "policy: {snapshot_min_interval_s: 1}\n"


def write_config(directory: Path, pki: Path, capture: Path, *, store: Path, port: int,
                 drop: str | None = None, signing_key: Path | None = None,
                 extra: str = POLICY) -> Path:
    """The shared agent config (tests/support), one file per left-out section."""
    return write_agent_config(directory, pki, port, capture=capture, store=store, drop=drop,
                              signing_key=signing_key, policy=extra,
                              name=f"agent-{drop or 'full'}.yaml")


def copy_store(store: Path, target: Path) -> Path:
    target.mkdir()
    for suffix in ("", "-wal", "-shm"):
        src = store.with_name(store.name + suffix)
        if src.exists():
            shutil.copy2(src, target / (store.name + suffix))
    return target / store.name


def entries_of(store_copy: Path) -> list[Entry]:
    with Outbox(store_copy) as box:
        entries = box.pending(100_000)
        assert len(box) == len(entries)
        return entries


@dataclass
class Runs:
    pki: Path
    capture: Path
    config: Path
    store: Path
    first: object
    second: object
    after_first: list[Entry]
    after_second: list[Entry]
    wall: tuple[float, float]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("daemon")
    pki = base / "pki"
    init_pki(pki, [VID])
    capture = base / "drive.log"
    write_capture(load_vehicle(DEMO_CONFIG), capture, 5.0, seed=2)
    store = base / "store" / "outbox.db"
    store.parent.mkdir()
    config = write_config(base, pki, capture, store=store, port=free_port())
    start = time.time()
    first = run(config, drain_timeout=1.0)
    after_first = entries_of(copy_store(store, base / "copy1"))
    second = run(config, drain_timeout=1.0)
    end = time.time()
    after_second = entries_of(copy_store(store, base / "copy2"))
    return Runs(pki, capture, config, store, first, second, after_first, after_second,
                (start, end))


@pytest.fixture(scope="module")
def verifier(runs) -> Verifier:
    return Verifier.from_jwks_file(runs.pki / "jwks.json")


def claims_of(entries: list[Entry], verifier: Verifier) -> list[dict]:
    out = []
    for entry in entries:
        header, claims = verifier.verify(entry.payload)
        assert header["alg"] == "ES256" and header["typ"] == "JWT"
        out.append(claims)
    return out


def offline_changes(capture: Path) -> list:
    pipeline = SignalPipeline(load_vehicle(DEMO_CONFIG).decoder())
    with open_capture(capture) as reader:
        return list(pipeline.run(reader))


# -- the run without a broker -------------------------------------------------------------------


def test_exit_code_and_message_say_what_stays_queued(runs):
    result = runs.first
    n = len(runs.after_first)
    assert n > 5
    assert result.exit_code == 1
    assert result.queued == n
    assert f"{n} message(s) stay queued" in result.message
    assert str(runs.store) in result.message
    assert "sent on the next start" in result.message
    assert "connection refused" in result.message          # the last error is named


def test_outbox_holds_every_message_with_contiguous_seq(runs, verifier):
    entries = runs.after_first
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    claims = claims_of(entries, verifier)
    for entry, c in zip(entries, claims):
        assert c["seq"] == entry.seq and c["vid"] == VID and c["boot"] == 1
        assert c["kind"] == entry.kind
        if entry.kind == "event":
            assert (entry.topic, entry.retain) == (EVENTS, False)
            assert set(c) == {"vid", "stream", "seq", "boot", "ts", "kind", "signals",
                              "quality"}
        else:
            assert entry.kind == "state"
            assert (entry.topic, entry.retain) == (STATE, True)
            assert set(c) == {"vid", "stream", "seq", "boot", "ts", "kind", "signals",
                              "quality", "age"}
        start, end = runs.wall
        assert int(start * 1000) <= c["ts"] <= int(end * 1000) + 1
    kinds = [e.kind for e in entries]
    assert kinds[-1] == "state"                              # the final snapshot (flush)
    assert kinds.count("state") >= 2                         # snapshot_min_interval_s: 1
    assert [c["ts"] for c in claims] == sorted(c["ts"] for c in claims)


def test_final_snapshot_is_the_last_value_of_every_signal(runs, verifier):
    final = {}
    for change in offline_changes(runs.capture):
        final[change.path] = (change.value, change.quality)
    paths = load_vehicle(DEMO_CONFIG).decoder().paths
    last = claims_of(runs.after_first[-1:], verifier)[0]
    assert set(last["signals"]) == set(paths) == set(last["age"])
    for path in paths:
        value, quality = final.get(path, (None, STALE))
        assert last["signals"][path] == (value if quality == VALID else None), path
        assert last["quality"].get(path, VALID) == quality, path
        assert last["age"][path] is not None and last["age"][path] >= 0


def test_events_replay_the_offline_decode(runs, verifier):
    """Per signal, the event values are an in-order subsequence of the decoded changes; for
    doors, locks, lids and windows, and every quality change, they are all of them."""
    decoded = defaultdict(list)
    for change in offline_changes(runs.capture):
        decoded[change.path].append((change.value, change.quality))
    sent = defaultdict(list)
    for c in claims_of(runs.after_first, verifier):
        if c["kind"] == "event":
            for path, value in c["signals"].items():
                sent[path].append((value, c["quality"].get(path, VALID)))
    assert set(sent) == set(decoded)              # every decoded signal went out at least once
    for path, seq in decoded.items():
        got = sent[path]
        it = iter(seq)
        assert all(x in it for x in got), (path, got, seq)     # in-order subsequence
        assert got[0] == seq[0]
        if path in IMMEDIATE:
            assert got == seq, path
        assert [x for x in got if x[1] != VALID] == [x for x in seq if x[1] != VALID], path
    # the drive has door, window, lock and trunk changes and a range sentinel
    assert len(decoded[IS_OPEN[0]]) >= 3 and len(decoded[WINDOWS[0]]) >= 3
    assert any(q == "invalid" for _, q in decoded["Vehicle.Powertrain.FuelSystem.Range"])


def test_every_snapshot_is_a_state_the_decode_went_through(runs, verifier):
    """Each state entry equals the decoded state after some prefix of the change stream, and
    those prefixes move forward in seq order."""
    changes = offline_changes(runs.capture)
    paths = load_vehicle(DEMO_CONFIG).decoder().paths
    index = {p: i for i, p in enumerate(paths)}
    prefixes = []
    state = VehicleState(paths)
    prefixes.append(view(state.snapshot(0.0)))
    for change in changes:
        state.apply(change.t, [(index[change.path], change.value, change.quality)])
        prefixes.append(view(state.snapshot(change.t)))
    position = 0
    snapshots = [c for c in claims_of(runs.after_first, verifier) if c["kind"] == "state"]
    for c in snapshots:
        seen = {p: (c["signals"][p], c["quality"].get(p, VALID)) for p in paths}
        matches = [k for k in range(position, len(prefixes)) if prefixes[k] == seen]
        assert matches, f"snapshot seq {c['seq']} matches no decoded state after #{position}"
        position = matches[0]


def view(snapshot: dict) -> dict:
    return {p: (e["value"] if e["quality"] == VALID else None, e["quality"])
            for p, e in snapshot.items()}


def test_claims_match_the_policy_run_offline_over_the_same_capture(runs, verifier):
    """The daemon's loop, replayed by hand: feed each frame, observe, due(frame time), then
    flush. The kinds and every event's signals/quality must come out the same."""
    vehicle = load_vehicle(runs.config)
    decoder = vehicle.decoder()
    pipeline = SignalPipeline(decoder)
    policy = PublishPolicy(decoder.paths, vehicle.config.policy)
    assert vehicle.config.policy == PolicyConfig(snapshot_min_interval_s=1.0)
    out = []
    t = None
    with open_capture(runs.capture) as reader:
        for msg in reader:
            changes = pipeline.feed(msg)
            if changes:
                policy.observe(changes)
            t = msg.timestamp
            out += policy.due(t)
    out += policy.flush(t)
    claims = claims_of(runs.after_first, verifier)
    assert [c["kind"] for c in claims] == [o.kind for o in out]
    for c, o in zip(claims, out):
        if o.kind == "event":
            assert c["signals"] == {ch.path: ch.value if ch.quality == VALID else None
                                    for ch in o.changes}
            assert c["quality"] == {ch.path: ch.quality for ch in o.changes
                                    if ch.quality != VALID}


def test_claims_match_values_written_down_for_this_drive(runs, verifier):
    """Independent of the project's decoder and policy: the 5 s drive of seed 2 decoded by
    hand (support.handdecode) and written down here from its raw frames."""
    claims = claims_of(runs.after_first, verifier)
    final = claims[-1]
    assert final["kind"] == "state"
    assert final["signals"] == final_values(runs.capture)
    assert {path: final["signals"][path] for path in (
        RANGE, REL, WINDOWS[0], IS_OPEN[0], TRUNK, "Vehicle.Exterior.AirTemperature")} == {
        RANGE: 526000, REL: 62.0, WINDOWS[0]: 10, IS_OPEN[0]: True, TRUNK: True,
        "Vehicle.Exterior.AirTemperature": 18.6}
    events = [c for c in claims if c["kind"] == "event"]
    # BodyStatus DoorFL (byte 0, bits 0-1): 0 at +0.004 s, 1 at +0.504 s, 0 at +0.904 s,
    # 1 at +4.604 s.
    assert [c["signals"][IS_OPEN[0]] for c in events if IS_OPEN[0] in c["signals"]] == \
        [False, True, False, True]
    # Cluster RangeKm: 528 km, the sentinel 1023 at +2.337 s (invalid, no value), then 527 km.
    ranges = [(c["signals"][RANGE], c["quality"].get(RANGE, VALID)) for c in events
              if RANGE in c["signals"]]
    assert ranges[0] == (528000, VALID)
    sentinel = ranges.index((None, "invalid"))
    assert ranges[sentinel + 1] == (527000, VALID)


# -- the second run ------------------------------------------------------------------------------


def test_second_run_continues_seq_and_counts_the_boot(runs, verifier):
    n = len(runs.after_first)
    entries = runs.after_second
    assert entries[:n] == runs.after_first                   # the queued ones are kept as is
    new = entries[n:]
    assert new and new[0].seq == n + 1
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    claims = claims_of(new, verifier)
    assert {c["boot"] for c in claims} == {2}
    assert [c["seq"] for c in claims] == [e.seq for e in new]
    # the same capture gives the same messages, apart from seq, boot, ts
    strip = lambda c: {k: v for k, v in c.items() if k not in ("seq", "boot", "ts")}  # noqa: E731
    assert [strip(c) for c in claims] == [strip(c) for c in claims_of(runs.after_first,
                                                                          verifier)]
    result = runs.second
    assert result.exit_code == 1 and result.queued == len(entries)
    assert f"{len(entries)} message(s) stay queued" in result.message


# -- configuration errors ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("agentcfg")
    pki = base / "pki"
    init_pki(pki, [VID])
    capture = base / "drive.log"
    capture.write_text("", encoding="ascii")
    return base, pki, capture


@pytest.mark.parametrize("section", ["mqtt", "can", "signing", "store"])
def test_missing_section_is_a_config_error_naming_it(small_setup, section):
    base, pki, capture = small_setup
    config = write_config(base, pki, capture, store=base / "outbox.db", port=free_port(),
                          drop=section)
    with pytest.raises(ConfigError) as info:
        Agent(config)
    message = str(info.value)
    assert f": {section}: missing" in message and str(config) in message, message
    assert not (base / "outbox.db").exists()                # nothing opened or created


def test_missing_signing_key_is_a_key_file_error_naming_the_file(small_setup):
    base, pki, capture = small_setup
    missing = base / "nowhere" / "VIN1.signing.key"
    config = write_config(base, pki, capture, store=base / "outbox-k.db", port=free_port(),
                          signing_key=missing)
    with pytest.raises(KeyFileError) as info:
        Agent(config)
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)
    assert not (base / "outbox-k.db").exists()


def test_a_failing_store_costs_one_message_not_the_daemon(small_setup, monkeypatch):
    """Disk full while storing: the daemon logs, counts and carries on; what was queued stays."""
    import sqlite3

    from agent.signals.policy import Outgoing
    from agent.signals.model import Change

    base, pki, capture = small_setup
    config = write_config(base, pki, capture, store=base / "outbox-full.db", port=free_port())
    agent = Agent(config)
    try:
        path = agent.decoder.paths[0]
        agent._commit([Outgoing("event", (Change(1.0, path, 50.0, "valid"),))], 1.0)
        assert len(agent.outbox) == 1
        real_add = agent.outbox.add

        def disk_full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(agent.outbox, "add", disk_full)
        agent._commit([Outgoing("event", (Change(2.0, path, 51.0, "valid"),)),
                       Outgoing("state")], 2.0)
        assert agent.store_errors == 2
        monkeypatch.setattr(agent.outbox, "add", real_add)
        agent._commit([Outgoing("event", (Change(3.0, path, 52.0, "valid"),))], 3.0)
        assert [e.seq for e in agent.outbox.pending(10)] == [1, 2]
    finally:
        agent.outbox.close()
