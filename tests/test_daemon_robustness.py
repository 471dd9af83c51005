"""Robustness of the real command line and the running daemon against bad input (subprocesses,
real files, a real mosquitto for the delivery part).

* The CLI never prints a traceback for garbage: ``check-config``, ``decode`` and ``replay``
  (onto python-can's ``virtual`` bus) on Hypothesis-generated (derandomized) garbage configs and
  captures exit 0 or 2, and an error is exactly one line, the last one; ``--debug`` may add a
  traceback.
* A running daemon keeps running and keeps its queue: ``car-agent run`` on a capture that mixes
  a simulated drive with garbage lines, wrong-length frames of mapped ids, error and remote
  frames, random ids, random CAN FD frames and wild timestamps, with the broker unreachable,
  exits 1 saying how many messages stay queued; the outbox holds seq 1..N without a gap, every
  entry a valid signed message. Run again against a real broker with the same store, the queue
  drains and the cloud watcher verifies every seq 1..M, no gap, no rejection.
* Live, in real time: the agent reads bad input, then stalls on a capture clock jump; it is
  still alive and publishing (heartbeat snapshots keep arriving), and SIGTERM stops it
  cleanly with everything delivered.

The bugs once pinned at the end are fixed; their tests stay as regression tests. A new known
bug is pinned by an ``xfail(strict=True)`` test.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.dev.broker import free_port
from agent.uplink.outbox import Outbox
from agent.dev.pki import init_pki
from agent.uplink.signing import Verifier
from agent.dev.simulate import write_capture
from agent.signals.vehicle import load_vehicle
from support.agent_run import Collector, run_agent, start_agent, write_agent_config
from support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo.yaml"
DEMO_DBC = ROOT / "dbc" / "demo_vehicle.dbc"
DEMO_MAPPING = ROOT / "config" / "mapping" / "demo_vehicle.yaml"
RANGE = "Vehicle.Powertrain.FuelSystem.Range"

CLI = dict(deadline=None, derandomize=True, database=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                  HealthCheck.data_too_large])


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          errors="replace", timeout=timeout, cwd=ROOT)


def check_cli(result: subprocess.CompletedProcess, command: str, debug: bool = False) -> None:
    """Exit 0 or 2; no traceback (unless --debug); an error is one line, the last one."""
    where = f"{result.args[3:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode in (0, 2), where
    if not debug:
        assert "Traceback" not in result.stderr, where
    if result.returncode == 2:
        lines = result.stderr.rstrip("\n").split("\n")
        prefix = f"car-agent {command}: error: "
        errors = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert len(errors) == 1 and errors[0] == len(lines) - 1, where
        assert len(lines[-1]) > len(prefix), where


def run_parallel(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: cli(*args), commands))


_COUNTER = iter(range(10**9))


def fresh(folder: Path, name: str) -> Path:
    sub = folder / f"case{next(_COUNTER)}"
    sub.mkdir()
    return sub / name


# --------------------------------------------------------------------------- garbage for the CLI

# The demo config with absolute paths, so that damage past the YAML layer reaches the DBC and
# the mapping.
_DEMO_TEXT = (f"vehicle_id: VIN1\ncan: {{interface: socketcan, channel: vcan0}}\n"
              f"dbc: [{DEMO_DBC}]\nmapping: {DEMO_MAPPING}\n"
              "signing: {key: pki/VIN1.signing.key}\n"
              "mqtt: {host: 127.0.0.1, port: 8883, ca: pki/ca.crt, cert: pki/VIN1.crt, "
              "key: pki/VIN1.key}\nstore: {path: outbox.db}\n").encode()
_SAFE = st.characters(blacklist_categories=("Cs",))    # line breaks included


def _damage(blob: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    for op, where, junk in ops:
        i = where % (len(blob) + 1)
        if op == 0:
            blob = blob[:i]
        elif op == 1:
            blob = blob[:i] + junk + blob[i + 1:]
        else:
            blob = blob[:i] + junk + blob[i:]
    return blob


_OPS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2**20), st.binary(min_size=1,
                                                                               max_size=8)),
                min_size=1, max_size=3)
_GARBAGE_CONFIGS = st.one_of(
    st.binary(max_size=300),
    _OPS.map(lambda ops: _damage(_DEMO_TEXT, ops)),
    st.dictionaries(st.sampled_from(["vehicle_id", "dbc", "mapping", "can", "mqtt", "x"]),
                    st.recursive(st.none() | st.integers() | st.text(_SAFE, max_size=8)
                                 | st.floats(), lambda c: st.lists(c, max_size=3)
                                 | st.dictionaries(st.text(_SAFE, max_size=5), c, max_size=3),
                                 max_leaves=8), max_size=6)
    .map(lambda d: json.dumps(d).encode()),          # JSON is YAML
)


@settings(max_examples=10, **CLI)
@given(blob=_GARBAGE_CONFIGS)
def test_check_config_on_garbage_never_prints_a_traceback(tmp_path, blob):
    path = fresh(tmp_path, "garbage.yaml")
    path.write_bytes(blob)
    result = cli("check-config", "--config", str(path))
    event(f"exit {result.returncode}")
    check_cli(result, "check-config")


_LINE = st.one_of(
    st.builds(lambda t, i, d: f"({t}) vcan0 {i:03X}#{d.hex()}", st.floats(0, 2e9),
              st.sampled_from([0x2B0, 0x3C8, 0x3D0]) | st.integers(0, 0x7FF), st.binary(max_size=8)),
    st.builds(lambda t, i, d: f"({t}) vcan0 {i:03X}##1{d.hex()}", st.floats(0, 2e9),
              st.integers(0, 0x7FF), st.sampled_from([12, 16, 64, 13]).flatmap(
                  lambda n: st.binary(min_size=n, max_size=n))),
    st.sampled_from(["date Mon Jan 5 10:00:00.000 am 2026", "base hex  timestamps absolute",
                     "   0.010000 1  3D0             Rx   d 8 9C 80 15 70 00 00 00 71",
                     "   0.030000 1  ErrorFrame", ";$FILEVERSION=2.1", ";$STARTTIME=46027.4",
                     ";$COLUMNS=N,O,T,B,I,d,R,L,D",
                     "      1        10.000 DT  1     03D0 Rx -  8    9C 80 15 70 00 00 00 71",
                     "", "x" * 1500]),
    st.text(_SAFE, max_size=40),
)
_GARBAGE_CAPTURES = st.tuples(
    st.sampled_from([".log", ".asc", ".trc", ".blf", ".log.gz", ".asc.gz", ".trc.gz"]),
    st.one_of(st.lists(_LINE, max_size=30).map(lambda ls: "\n".join(ls).encode() + b"\n"),
              st.binary(max_size=400)))


@settings(max_examples=10, **CLI)
@given(capture=_GARBAGE_CAPTURES)
def test_decode_and_replay_on_garbage_never_print_a_traceback(tmp_path, capture):
    suffix, blob = capture
    path = fresh(tmp_path, f"garbage{suffix}")
    # Half of the gzip files are cut short: a damaged .gz is a one-line error, not a crash.
    data = gzip.compress(blob) if suffix.endswith(".gz") else blob
    if suffix.endswith(".gz") and len(blob) % 2:
        data = data[: len(data) // 2]
    path.write_bytes(data)
    decoded, replayed = run_parallel(
        ("decode", str(path), "--config", str(DEMO)),
        ("replay", str(path), "--interface", "virtual", "--channel", "x", "--no-timing",
         "--quiet"))
    event(f"decode exit {decoded.returncode}, replay exit {replayed.returncode}")
    check_cli(decoded, "decode")
    check_cli(replayed, "replay")
    for line in decoded.stdout.splitlines():   # decode's output stays JSON lines
        change = json.loads(line)
        assert set(change) == {"t", "signal", "value", "quality"}


def test_missing_files_and_bad_arguments_are_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    capture = tmp_path / "c.log"
    capture.write_text("(1.0) vcan0 3D0#0000000000000000\n")
    results = run_parallel(
        ("check-config", "--config", str(missing)),
        ("decode", str(tmp_path / "nope.log"), "--config", str(DEMO)),
        ("decode", str(capture), "--config", str(missing)),
        ("decode", str(tmp_path), "--config", str(DEMO)),
        ("replay", str(capture), "--interface", "no-such-interface", "--channel", "x"),
        ("replay", str(capture), "--interface", "virtual", "--channel", "x", "--ids", "zz"),
    )
    for result, command in zip(results, ["check-config", "decode", "decode", "decode", "replay",
                                         "replay"]):
        check_cli(result, command)
        assert result.returncode == 2


def test_debug_may_add_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vehicle_id: [\n")
    plain, debug = run_parallel(("check-config", "--config", str(path)),
                                ("--debug", "check-config", "--config", str(path)))
    check_cli(plain, "check-config")
    check_cli(debug, "check-config", debug=True)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" in debug.stderr
    assert plain.stderr.splitlines()[-1] == debug.stderr.splitlines()[-1]


# --------------------------------------------------------------------------- the daemon


def _hostile_drive(clean: Path, out: Path, seed: int = 7, wild_time: bool = True,
                   until: float | None = None) -> dict[str, int]:
    """The clean drive with bad input inserted every few lines; returns what was inserted.

    ``until``: only the first ``until`` seconds of the drive.
    """
    rng = random.Random(seed)
    mapped = {0x2B0: 8, 0x3C8: 4, 0x3D0: 8}
    garbage = ["garbage", "(x) vcan0 3D0#00", "(1.0) vcan0 3G0#00", "(1.0) vcan0 3D0#0",
               "(1.0) vcan0 3D0#" + "00" * 9, "(nan) vcan0 3D0#00", "(1.0)", "\x00\x01\x02 nul",
               "(1.0) vcan0 18FF50E5##1" + "00" * 13, "(1.0) vcan0 800#00", "x" * 2000,
               "(1.0) vcan0 3D0#\u00e9\u00e9", "(1.0) vcan0 123#R  extra field ok?"]
    counts = dict.fromkeys(["garbage", "wrong_length", "error", "remote", "random", "fd"]
                           + (["wild_time"] if wild_time else []), 0)
    lines: list[str] = []
    start = None
    for n, line in enumerate(clean.read_text().splitlines()):
        t = float(line.split(" ", 1)[0][1:-1])
        start = t if start is None else start
        if until is not None and t - start > until:
            break
        lines.append(line)
        if n % 5:
            continue
        stamp = line.split(" ", 1)[0]                 # "(t)": keeps the capture in order
        kind = rng.choice(list(counts))
        if kind == "garbage":
            lines.append(rng.choice(garbage))
        elif kind == "wrong_length":
            ident, length = rng.choice(list(mapped.items()))
            size = rng.choice([n for n in range(9) if n != length])
            lines.append(f"{stamp} vcan0 {ident:03X}#{rng.randbytes(size).hex().upper()}")
        elif kind == "error":
            lines.append(f"{stamp} vcan0 {0x20000000 | rng.randrange(0x400):08X}#"
                         f"{rng.randbytes(8).hex()}")
        elif kind == "remote":
            lines.append(f"{stamp} vcan0 {rng.choice(list(mapped)):03X}#R")
        elif kind == "random":
            if rng.random() < 0.5:
                lines.append(f"{stamp} vcan0 {rng.randrange(0x800):03X}#"
                             f"{rng.randbytes(rng.randrange(9)).hex()}")
            else:
                lines.append(f"{stamp} vcan0 {rng.randrange(0x20000000):08X}#"
                             f"{rng.randbytes(rng.randrange(9)).hex()}")
        elif kind == "fd":
            ident = rng.choice(list(mapped) + [rng.randrange(0x800)])
            size = rng.choice([0, 8, 12, 16, 20, 24, 32, 48, 64])
            lines.append(f"{stamp} vcan0 {ident:03X}##{rng.randrange(4)}"
                         f"{rng.randbytes(size).hex()}")
        else:   # a frame from far in the future or the past (a clock jump), unmapped id
            t = float(stamp[1:-1]) + rng.choice([1e6, -1e6, 3600.0, -5.0])
            lines.append(f"({t:.6f}) vcan0 7FF#00")
        counts[kind] += 1
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


_BUSY_POLICY = ("policy: {min_interval_s: 0, snapshot_min_interval_s: 0.5, heartbeat_s: 1, "
                "max_messages_per_s: 50}")


def _agent_yaml(folder: Path, capture: Path, store: Path, signing: Path, port: int, ca: Path,
                cert: Path, key: Path, name: str) -> Path:
    return write_agent_config(folder, ca.parent, port, capture=capture, store=store,
                              signing_key=signing, ca=ca, cert=cert, key=key, name=name,
                              policy=_BUSY_POLICY)


def copy_store(store: Path, folder: Path) -> Path:
    """A copy of the outbox's files: opening the original would count as a boot."""
    folder.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{store}{suffix}")
        if source.exists():
            shutil.copy2(source, folder / (store.name + suffix))
    return folder / store.name


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The agent on the hostile drive with the broker unreachable (a closed loopback port)."""
    folder = tmp_path_factory.mktemp("offline")
    pki = folder / "pki"
    init_pki(pki, ["VIN1"])
    clean = folder / "clean.log"
    write_capture(load_vehicle(DEMO), clean, 10, seed=4)
    capture = folder / "hostile.log"
    inserted = _hostile_drive(clean, capture)
    store = folder / "outbox.db"
    config = _agent_yaml(folder, capture, store, pki / "VIN1.signing.key", free_port(),
                         pki / "ca.crt", pki / "VIN1.crt", pki / "VIN1.key", "offline.yaml")
    started = time.monotonic()
    result = run_agent(config, "--drain-timeout", "1")
    return {"folder": folder, "pki": pki, "capture": capture, "store": store, "result": result,
            "inserted": inserted, "seconds": time.monotonic() - started}


def test_daemon_keeps_running_and_keeps_its_queue_under_bad_input(offline_run):
    result = offline_run["result"]
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result.returncode == 1, stderr[-3000:]
    last = stderr.rstrip("\n").split("\n")[-1]
    match = re.fullmatch(r"car-agent run: could not deliver within 1 s: (\d+) message\(s\) stay "
                         r"queued in .*outbox\.db and are sent on the next start.*", last)
    assert match, last
    queued = int(match.group(1))
    assert queued > 10, "a busy policy on a 10 s drive signs more than that"

    # It read everything: every bad frame counted, every bad line reported once, on one line.
    inserted = offline_run["inserted"]
    stats = re.findall(r"stats: (\d+) frames, (\d+) decoded, (\d+) error frames, (\d+) wrong "
                       r"length", stderr)
    assert stats, stderr[-3000:]
    frames, decoded, error_frames, wrong_length = map(int, stats[-1])
    assert error_frames == inserted["error"]
    assert wrong_length >= inserted["wrong_length"]
    assert decoded > 100
    clean_lines = sum(1 for _ in (offline_run["folder"] / "clean.log").open())
    valid_inserted = sum(v for k, v in inserted.items() if k != "garbage")
    assert frames == clean_lines + valid_inserted
    malformed = [line for line in stderr.splitlines() if "malformed line(s) skipped" in line]
    assert len(malformed) == 1
    assert f"{inserted['garbage']} malformed line(s) skipped" in malformed[0]

    # The queue: seq 1..N, no gap, each entry a signed message carrying its own seq.
    copy = copy_store(offline_run["store"], offline_run["folder"] / "copy1")
    verifier = Verifier.from_jwks_file(offline_run["pki"] / "jwks.json")
    with Outbox(copy) as outbox:
        entries = outbox.pending(10**6)
        stats_ = outbox.stats()
    assert [e.seq for e in entries] == list(range(1, queued + 1))
    assert stats_.next_seq == queued + 1 and stats_.delivered == 0
    kinds = set()
    for entry in entries:
        assert entry.topic == f"vehicles/VIN1/{'events' if entry.kind == 'event' else 'state'}"
        _, claims = verifier.verify(entry.payload)
        assert claims["seq"] == entry.seq and claims["vid"] == "VIN1" and claims["boot"] == 1
        kinds.add(entry.kind)
        for path, value in claims["signals"].items():
            if path.endswith(("IsOpen", "IsLocked", "IsFuelLevelLow")):
                assert value is None or type(value) is bool
            if path.endswith(("RelativeLevel", "Window.Position")) and value is not None:
                assert 0 <= value <= 100
    assert kinds == {"event", "state"}
    print(f"offline run: {offline_run['seconds']:.1f} s, {frames} frames ({decoded} decoded, "
          f"{error_frames} error frames, {wrong_length} wrong length), inserted {inserted}, "
          f"{queued} messages kept in the outbox")


@pytest.mark.mqtt
def test_the_kept_queue_drains_to_a_real_broker_without_gap_or_rejection(
        offline_run, tmp_path, pki, broker, cloud_config):
    first = offline_run["result"]
    assert first.returncode == 1, first.stderr[-3000:]
    queued = int(re.search(r"(\d+) message\(s\) stay queued", first.stderr).group(1))
    signing_pki = offline_run["pki"]          # the messages were signed with this key
    config = _agent_yaml(tmp_path, offline_run["capture"], offline_run["store"],
                         signing_pki / "VIN1.signing.key", broker.port, pki / "ca.crt",
                         pki / "VIN1.crt", pki / "VIN1.key", "online.yaml")
    with Collector(cloud_config(trust=signing_pki / "jwks.json")) as cloud:
        result = run_agent(config, "--drain-timeout", "30")
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.rstrip("\n").split("\n")[-1] == "car-agent run: stopped; outbox empty"
        assert cloud.wait_offline()
    records = cloud.records
    assert [r for r in records if "rejected" in r] == []
    verified = [r for r in records if r.get("verified")]
    seqs = sorted(r["seq"] for r in verified)
    assert seqs == list(range(1, len(seqs) + 1)), "every seq once, none missing"
    assert len(seqs) > queued, "the second run added its own messages after the kept ones"
    assert {r["boot"] for r in verified if r["seq"] <= queued} == {1}
    assert {r["boot"] for r in verified if r["seq"] > queued} == {2}
    assert any(r.get("status") == "offline" for r in records)
    with Outbox(copy_store(offline_run["store"], tmp_path / "copy2")) as outbox:
        assert len(outbox) == 0 and outbox.stats().delivered == len(seqs)
    print(f"online run: {queued} kept + {len(seqs) - queued} new messages verified, seq 1..{len(seqs)}")


@pytest.mark.mqtt
def test_live_daemon_survives_bad_input_and_a_stalled_capture_then_stops_cleanly(
        tmp_path, pki, broker, cloud_config):
    """Realtime: the agent reads 2 s of hostile input, then waits for a frame stamped half an
    hour later (a pause in the capture; a jump of more than an hour would be re-based and not
    waited for). It is still alive and publishing, and SIGTERM still stops it at once: exit 0,
    everything signed delivered, every seq once."""
    import signal

    clean = tmp_path / "clean.log"
    write_capture(load_vehicle(DEMO), clean, 3, seed=5)
    capture = tmp_path / "live.log"
    _hostile_drive(clean, capture, seed=11, wild_time=False, until=2.0)
    last = float(capture.read_text().splitlines()[-1].split(" ", 1)[0][1:-1])
    with capture.open("a") as f:
        f.write(f"({last + 1800:.6f}) vcan0 3D0#9C80157000000071\n")
    config = _agent_yaml(tmp_path, capture, tmp_path / "outbox.db", pki / "VIN1.signing.key",
                         broker.port, pki / "ca.crt", pki / "VIN1.crt", pki / "VIN1.key",
                         "live.yaml")
    config.write_text(config.read_text().replace("realtime: false", "realtime: true"))
    with Collector(cloud_config()) as cloud:
        records, problems = cloud.records, cloud.problems
        agent = start_agent(config)
        try:
            assert wait_for(lambda: any(r.get("verified") for r in records)
                            or agent.poll() is not None, 20), problems
            assert agent.poll() is None, agent.stderr.read()[-3000:]
            # The 2 s of input are over when the cluster's range goes stale: from then on the
            # agent waits for the jump. Still publishing: heartbeat snapshots keep coming.
            def stale_states() -> list[int]:
                return [r["seq"] for r in records if r.get("kind") == "state"
                        and r["quality"].get(RANGE) == "stale"]

            assert wait_for(stale_states, 20), (problems, agent.poll())
            stalled = stale_states()[0]
            assert wait_for(lambda: len([r for r in records if r.get("kind") == "state"
                                         and r["seq"] > stalled]) >= 2, 20), records[-3:]
            assert agent.poll() is None, agent.stderr.read()[-3000:]
            agent.send_signal(signal.SIGTERM)
            _, stderr = agent.communicate(timeout=15)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
        assert "Traceback" not in stderr, stderr[-3000:]
        assert agent.returncode == 0, stderr[-3000:]
        assert stderr.rstrip("\n").split("\n")[-1] == "car-agent run: stopped; outbox empty"
        assert cloud.wait_offline()
    assert [r for r in records if "rejected" in r] == []
    seqs = sorted(r["seq"] for r in records if r.get("verified"))
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3
    print(f"live run: {len(seqs)} messages verified, stopped by SIGTERM while stalled")


# ------------------------------------------------- regressions (bugs once pinned here, now fixed)


def test_check_config_huge_integer_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vehicle_id: 0x" + "f" * 4000 + "\ndbc: a.dbc\nmapping: m.yaml\n")
    check_cli(cli("check-config", "--config", str(path)), "check-config")


def _truncated_gz(tmp_path: Path, name: str, text: bytes) -> Path:
    path = tmp_path / name
    packed = gzip.compress(text)
    path.write_bytes(packed[:len(packed) // 2])
    return path


def test_damaged_gzip_capture_decode_and_run(tmp_path):
    capture = _truncated_gz(tmp_path, "drive.log.gz", b"(1.0) vcan0 3D0#9C80157000000071\n" * 500)
    check_cli(cli("decode", str(capture), "--config", str(DEMO)), "decode")
    pki = tmp_path / "pki"
    init_pki(pki, ["VIN1"])
    config = _agent_yaml(tmp_path, capture, tmp_path / "outbox.db", pki / "VIN1.signing.key",
                         free_port(), pki / "ca.crt", pki / "VIN1.crt", pki / "VIN1.key", "a.yaml")
    result = run_agent(config, "--drain-timeout", "1")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_damaged_gzip_capture_asc_terminates(tmp_path):
    capture = _truncated_gz(tmp_path, "drive.asc.gz",
                            b"date Mon Jan 5 10:00:00.000 am 2026\nbase hex  timestamps absolute\n"
                            + b"   0.010000 1  3D0   Rx   d 8 9C 80 15 70 00 00 00 71\n" * 500)
    check_cli(cli("decode", str(capture), "--config", str(DEMO), timeout=4), "decode")
