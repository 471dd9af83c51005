"""The CLI's core commands run as `python -m agent ...`: check-config, decode, simulate."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from agent.dev.simulate import write_capture
from coredata import DEMO_DBC, DEMO_MAPPING, REPO, demo_vehicle, write


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"car-agent {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture
def config(tmp_path):
    """A config for the demo vehicle (decode needs only vehicle_id, dbc and mapping)."""
    return write(tmp_path / "car.yaml",
                 f"vehicle_id: VIN1\ndbc: [{DEMO_DBC}]\nmapping: {DEMO_MAPPING}\n")


# -- check-config ------------------------------------------------------------------------------


def test_check_config_demo_is_ok():
    result = run("check-config", "--config", "config/demo.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout.splitlines()
    assert out[0] == "config/demo.yaml: OK"
    assert "vehicle VIN1; 1 DBC file(s), 9 messages" in out[1]
    assert "19 VSS signals from 4 frame id(s):" in out[2]
    assert any("Cluster (stale after 0.3 s): Vehicle.Powertrain.FuelSystem.RelativeLevel" in line
               for line in out)
    # The daemon signs through the libcrypto that TLS loaded, not the cryptography package.
    assert any(line.startswith("  signing with: libcrypto (OpenSSL ") for line in out)


@pytest.mark.parametrize("text,words", [
    ("vehicle_id: VIN/1\ndbc: a.dbc\nmapping: m.yaml\n", "vehicle_id: 'VIN/1'"),
    ("vehicle_id: VIN1\ndbc: [a.dbc\n", "YAML syntax error"),
    ("vehicle_id: VIN1\ndbc: nope.dbc\nmapping: m.yaml\n", "nope.dbc: DBC file not found"),
    ("- a list\n", "top level: expected a mapping"),
    (f"vehicle_id: VIN1\ndbc: [{DEMO_DBC}]\nmapping: nope.yaml\n", "mapping file not found"),
])
def test_check_config_broken_is_one_stderr_line(tmp_path, text, words):
    path = write(tmp_path / "broken.yaml", text)
    result = run("check-config", "--config", str(path))
    assert result.returncode == 2 and result.stdout == ""
    line = assert_one_line_error(result, "check-config")
    assert words in line


def test_check_config_says_a_message_needs_can_fd(tmp_path):
    """Issue 16.5: a 10-byte message not marked FD travels only in 12-byte CAN FD frames."""
    from coredata import DBC_HEADER

    write(tmp_path / "odd.dbc", DBC_HEADER + "BO_ 1536 Odd: 10 ECU\n"
          ' SG_ Level : 72|8@1+ (1,0) [0|100] "%" ECU\n')
    write(tmp_path / "m.yaml", "signals:\n  Vehicle.Test.Level: {message: Odd, signal: Level}\n")
    config = write(tmp_path / "c.yaml", "vehicle_id: V\ndbc: odd.dbc\nmapping: m.yaml\n")
    result = run("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert ("  note: Odd (10 bytes) needs CAN FD (not marked FD in the DBC): it travels in "
            "12-byte frames") in result.stdout.splitlines()


def test_check_config_mapping_bound_to_dbc_error(tmp_path):
    mapping = write(tmp_path / "m.yaml", "signals:\n  Vehicle.Powertrain.FuelSystem.Range:\n"
                                         "    message: Cluster\n    signal: RangeMiles\n")
    path = write(tmp_path / "car.yaml", f"vehicle_id: V\ndbc: {DEMO_DBC}\nmapping: m.yaml\n")
    line = assert_one_line_error(run("check-config", "--config", str(path)), "check-config")
    assert f"{mapping}: signals.Vehicle.Powertrain.FuelSystem.Range.signal: message Cluster " \
           "has no signal 'RangeMiles'" in line


def test_debug_adds_a_traceback(tmp_path):
    path = write(tmp_path / "broken.yaml", "vehicle_id: VIN/1\ndbc: a.dbc\nmapping: m.yaml\n")
    result = run("--debug", "check-config", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("car-agent check-config: error: ")


# -- decode ------------------------------------------------------------------------------------

CAPTURE = """\
(1700000000.000000) can0 3D0#9C80157000000071
(1700000000.010000) can0 2B0#000F0000000000BF
(1700000000.020000) can0 3D0#9C80157000000071
this is not a frame
(1700000000.050000) can1 2B0#010F0000000000C0
(1700000000.060000) can0 3D0#9B80157000000070
(1700000000.070000) can0 3C8#00A80000
(1700000000.080000) can0 18FF50E5#0000AC4164000000
(1700000000.090000) can0 3D0#FF80157000000000
(1700000000.100000) can0 123#ZZ
"""

F = "Vehicle.Powertrain.FuelSystem."
D = "Vehicle.Cabin.Door."
EXPECTED = [
    '{"t": 1700000000.0, "signal": "%sRelativeLevel", "value": 62.4, "quality": "valid"}' % F,
    '{"t": 1700000000.0, "signal": "%sAbsoluteLevel", "value": 34.3, "quality": "valid"}' % F,
    '{"t": 1700000000.0, "signal": "%sRange", "value": 512000, "quality": "valid"}' % F,
    '{"t": 1700000000.0, "signal": "%sIsFuelLevelLow", "value": false, "quality": "valid"}' % F,
    *[f'{{"t": 1700000000.01, "signal": "{D}{door}.IsOpen", "value": false, "quality": "valid"}}'
      for door in ("Row1.DriverSide", "Row1.PassengerSide", "Row2.DriverSide",
                   "Row2.PassengerSide")],
    *[f'{{"t": 1700000000.01, "signal": "{D}{door}.IsLocked", "value": true, "quality": "valid"}}'
      for door in ("Row1.DriverSide", "Row1.PassengerSide", "Row2.DriverSide",
                   "Row2.PassengerSide")],
    '{"t": 1700000000.01, "signal": "Vehicle.Body.Trunk.Rear.IsOpen", "value": false, '
    '"quality": "valid"}',
    '{"t": 1700000000.01, "signal": "Vehicle.Body.Hood.IsOpen", "value": false, '
    '"quality": "valid"}',
    '{"t": 1700000000.05, "signal": "%sRow1.DriverSide.IsOpen", "value": true, '
    '"quality": "valid"}' % D,
    '{"t": 1700000000.06, "signal": "%sRelativeLevel", "value": 62.0, "quality": "valid"}' % F,
    '{"t": 1700000000.07, "signal": "%sRow1.DriverSide.Window.Position", "value": 40, '
    '"quality": "valid"}' % D,
    '{"t": 1700000000.08, "signal": "Vehicle.Exterior.AirTemperature", "value": 21.5, '
    '"quality": "valid"}',
    '{"t": 1700000000.09, "signal": "%sRelativeLevel", "value": null, "quality": "invalid"}' % F,
]


def test_decode_prints_the_exact_json_lines(tmp_path, config):
    capture = write(tmp_path / "drive.log", CAPTURE)
    result = run("decode", str(capture), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == EXPECTED
    for line in result.stdout.splitlines():
        assert list(json.loads(line)) == ["t", "signal", "value", "quality"]


def test_decode_reports_malformed_lines_once_with_numbers(tmp_path, config):
    capture = write(tmp_path / "drive.log", CAPTURE)
    result = run("decode", str(capture), "--config", str(config))
    err = result.stderr.splitlines()
    malformed = [line for line in err if "malformed line(s)" in line]
    assert malformed == [f"{capture}: 2 malformed line(s) skipped: line 4 (expected '(time) "
                         "channel id#data'), line 10 (bad data bytes)"]
    assert "Traceback" not in result.stderr
    assert err[-1] == (f"{capture}: 8 frames, 7 decoded, 0 error frames, 0 wrong length, "
                       "1 unchanged, 0 unmapped, 0 remote frames, 0 undecodable, 0 unknown page; "
                       f"{len(EXPECTED)} signal changes"), err


def test_decode_summary_counts_every_frame_in_one_named_bucket(tmp_path, config):
    """Issue 13.12/16.6: remote frames, error frames and wrong lengths are named; the buckets
    add up to the frame count."""
    capture = write(tmp_path / "drive.log", CAPTURE.replace(
        "this is not a frame\n", "(1700000000.030000) can0 3D0#R\n"
        "(1700000000.031000) can0 3D0#R8\n(1700000000.032000) can0 20000004#0004000000000000\n"
        "(1700000000.033000) can0 3D0#0102\n(1700000000.034000) can0 7FF#00\n"))
    result = run("decode", str(capture), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"{capture}: 13 frames, 7 decoded, 1 error frames, 1 wrong length, 1 unchanged, "
        f"1 unmapped, 2 remote frames, 0 undecodable, 0 unknown page; {len(EXPECTED)} signal "
        "changes")


@pytest.mark.parametrize("name, content", [
    ("g.asc", bytes(range(256)) * 8), ("g.trc", b"hello\nworld\n"), ("g.blf", bytes(500)),
])
def test_decode_of_a_file_that_is_no_capture_is_one_error_line(tmp_path, config, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    result = run("decode", str(path), "--config", str(config))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"car-agent decode: error: {path}: not a capture file (expected "), result.stderr


def test_decode_channel_filter(tmp_path, config):
    capture = write(tmp_path / "drive.log", CAPTURE)
    result = run("decode", str(capture), "--config", str(config), "--channel", "can0")
    assert result.returncode == 0
    expected = [line for line in EXPECTED if '"t": 1700000000.05' not in line]
    assert result.stdout.splitlines() == expected
    assert "1 on other channels" in result.stderr

    only_can1 = run("decode", str(capture), "--config", str(config), "--channel", "can1")
    assert [json.loads(line)["t"] for line in only_can1.stdout.splitlines()] == [1700000000.05] * 10


def test_decode_asc_named_log(tmp_path, config):
    capture = write(tmp_path / "vector.log",
                    "date Mon Jan 5 10:00:00.000 am 2026\nbase hex  timestamps absolute\n"
                    "internal events logged\nBegin Triggerblock Mon Jan 5 10:00:00.000 am 2026\n"
                    "   0.010000 1  3D0             Rx   d 8 9C 80 15 70 00 00 00 71\n"
                    "   0.020000 2  3D0             Rx   d 8 96 80 15 70 00 00 00 6B\n"
                    "End TriggerBlock\n")
    result = run("decode", str(capture), "--config", str(config), "--channel", "2")
    assert result.returncode == 0, result.stderr
    rel = [json.loads(line) for line in result.stdout.splitlines()
           if json.loads(line)["signal"].endswith("RelativeLevel")]
    assert [(r["value"], r["quality"]) for r in rel] == [(60.0, "valid")]


def test_decode_missing_capture_is_one_line(tmp_path, config):
    missing = tmp_path / "nope.log"
    result = run("decode", str(missing), "--config", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert assert_one_line_error(result, "decode") == \
        f"car-agent decode: error: {missing}: capture file not found"


def test_decode_with_broken_config_is_one_line(tmp_path):
    capture = write(tmp_path / "drive.log", CAPTURE)
    broken = write(tmp_path / "broken.yaml", "vehicle_id: V\ndbc: []\nmapping: m.yaml\n")
    line = assert_one_line_error(run("decode", str(capture), "--config", str(broken)), "decode")
    assert f"{broken}: dbc: expected one DBC path" in line


# -- simulate ----------------------------------------------------------------------------------


def test_simulate_writes_the_same_capture_as_the_library(tmp_path):
    out = tmp_path / "sim.log"
    result = run("simulate", "--config", "config/demo.yaml", "--duration", "2", "--seed", "7",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected = io.StringIO()
    frames = write_capture(demo_vehicle(), expected, 2.0, seed=7)
    assert out.read_text() == expected.getvalue()
    assert result.stderr.startswith(f"simulate: wrote {frames} frames (2 s, ")


def test_simulate_to_stdout_then_decode(tmp_path, config):
    result = run("simulate", "--config", "config/demo.yaml", "--duration", "1", "--out", "-")
    assert result.returncode == 0
    capture = write(tmp_path / "sim.log", result.stdout)
    decoded = run("decode", str(capture), "--config", str(config))
    first = json.loads(decoded.stdout.splitlines()[0])
    assert first["t"] >= 1767225600.0 and first["quality"] == "valid"
    assert "malformed line(s)" not in decoded.stderr


@pytest.mark.parametrize("duration", ["0", "-1", "abc", "inf"])
def test_simulate_rejects_bad_durations(tmp_path, duration):
    result = run("simulate", "--config", "config/demo.yaml", "--duration", duration,
                 "--out", str(tmp_path / "x.log"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "x.log").exists()


def test_simulate_unwritable_output_is_one_line(tmp_path):
    target = tmp_path / "missing-dir" / "sim.log"
    result = run("simulate", "--config", "config/demo.yaml", "--duration", "1",
                 "--out", str(target))
    line = assert_one_line_error(result, "simulate")
    assert f"{target}: cannot write capture" in line


def test_mask_vin_also_masks_the_final_error_line(tmp_path):
    """Issue 13.12: with logging.mask_vin the last line (an error naming a file after the
    vehicle) does not leak the vehicle id either."""
    vin = "WVWZZZ1JZXW000001"
    config = write(tmp_path / "car.yaml", f"""\
vehicle_id: {vin}
dbc: {DEMO_DBC}
mapping: {REPO / "config" / "mapping" / "demo_vehicle.yaml"}
can: {{interface: virtual, channel: mask-test}}
signing: {{key: keys/{vin}.signing.key}}
mqtt: {{host: 127.0.0.1, ca: keys/ca.crt, cert: keys/{vin}.crt, key: keys/{vin}.key}}
store: {{path: outbox.db}}
logging: {{mask_vin: true}}
""")
    result = run("run", "--config", str(config))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("car-agent run: error: ") and "*" * 13 + "0001" in last, last
    assert vin not in result.stderr, result.stderr
    # Without mask_vin the same line names the vehicle.
    write(config, config.read_text().replace("logging: {mask_vin: true}\n", ""))
    assert vin in run("run", "--config", str(config)).stderr.strip().splitlines()[-1]
