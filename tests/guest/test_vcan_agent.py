"""The agent and the replay tool on a real kernel vcan (run inside tools/vcan-vm by `make test`).

Frames travel through the kernel's SocketCAN stack here: can-utils' candump records what our
replay sends, canplayer feeds the agent, and the interface counters prove the agent never
transmits.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import can
import pytest

from agent.can.capture import format_candump, open_capture
from agent.dev.simulate import write_capture
from agent.signals.state import SignalPipeline
from agent.signals.vehicle import load_vehicle
from support.agent_run import Collector as BaseCollector, write_agent_config
from support.handdecode import DOORS, LOCKS, door_changes, final_values
from support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo.yaml"
AGENT = [sys.executable, "-m", "agent"]

pytestmark = pytest.mark.vcan


def sysfs_counter(iface: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/{name}").read_text())


@pytest.fixture(scope="module", autouse=True)
def vcan_present():
    if not Path("/sys/class/net/vcan0").exists():
        pytest.fail("no vcan0: these tests run inside tools/vcan-vm (make test does that)")


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> Path:
    """A 6 s simulated drive on vcan0 (seed 5): ~12,000 frames."""
    path = tmp_path_factory.mktemp("drive") / "drive.log"
    write_capture(load_vehicle(DEMO), path, 6.0, seed=5, channel="vcan0")
    return path


def receivers(iface: str) -> int:
    """CAN_RAW receivers the kernel has registered on ``iface`` (one per bound socket
    without filters, as candump's)."""
    text = Path("/proc/net/can/rcvlist_all").read_text()
    return sum(1 for line in text.splitlines() if line.split()[:1] == [iface])


class Candump:
    """can-utils candump -L on an interface, recording to a file."""

    def __init__(self, iface: str, out: Path) -> None:
        self.out = out
        self.handle = open(out, "w")
        before = receivers(iface)
        self.proc = subprocess.Popen(["candump", "-L", "-r", "8388608", iface],
                                     stdout=self.handle, stderr=subprocess.PIPE, text=True)
        # The receiver must be listening before anything is sent: wait until its socket is
        # bound, i.e. the kernel lists one more receiver on the interface.
        assert wait_for(lambda: self.proc.poll() is not None
                        or receivers(iface) > before, 30), "candump never bound its socket"
        assert self.proc.poll() is None, self.proc.stderr.read()

    def stop(self, expected: int | None = None) -> list[str]:
        """Stop once ``expected`` frames are recorded or the recording stopped growing for 2 s
        (candump may lag behind a fast sender under User-Mode Linux)."""
        size, still = -1, time.monotonic()
        while time.monotonic() - still < 2.0:
            self.handle.flush()
            lines = self.out.read_text().count("\n")
            if expected is not None and lines >= expected:
                break
            if lines != size:
                size, still = lines, time.monotonic()
            time.sleep(0.2)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        self.handle.close()
        return self.out.read_text().splitlines()


def frames_of(lines: list[str]) -> list[tuple[str, str]]:
    """(id, data-with-flags) of candump -L lines: timestamps and channel names dropped.

    The CAN FD flags nibble is compared without CANFD_FDF (0x4): recent kernels set it on
    every FD frame they deliver; "##" already says the frame is FD.
    """
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("("):
            ident, _, data = parts[2].partition("#")
            if data.startswith("#") and len(data) >= 2:
                data = f"#{int(data[1], 16) & 0x3:X}{data[2:]}"
            out.append((ident, data))
    return out


def stamps_of(lines: list[str]) -> list[float]:
    return [float(line.split()[0][1:-1]) for line in lines if line.startswith("(")]


def replay(capture: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(AGENT + ["replay", str(capture), "--channel", "vcan0", *args],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result


def sent_count(result: subprocess.CompletedProcess) -> int:
    return int(re.search(r"replay: (\d+) frames sent", result.stderr).group(1))


def test_replay_with_timing_is_frame_identical_and_keeps_the_duration(tmp_path, drive):
    dump = Candump("vcan0", tmp_path / "dump.log")
    result = replay(drive)
    source = drive.read_text().splitlines()
    recorded = dump.stop(len(source))
    assert frames_of(recorded) == frames_of(source)        # ids, data, flags, order
    assert sent_count(result) == len(source)
    # With timing, the last frame cannot go out before its time (how late it may be is
    # the machine's business: `make bench` measures it, no test asserts speed).
    want = stamps_of(source)[-1] - stamps_of(source)[0]
    got = stamps_of(recorded)[-1] - stamps_of(recorded)[0]
    assert got >= want - 0.001, (got, want)
    assert "timing error p50" in result.stderr


def test_replay_without_timing_is_frame_identical(tmp_path, drive):
    dump = Candump("vcan0", tmp_path / "dump.log")
    replay(drive, "--no-timing")
    source = drive.read_text().splitlines()
    assert frames_of(dump.stop(len(source))) == frames_of(source)


def test_canplayer_output_replayed_by_us_and_ours_by_canplayer(tmp_path, drive):
    # canplayer -> candump -> our replay -> candump: both directions through the kernel.
    first = Candump("vcan0", tmp_path / "from-canplayer.log")
    subprocess.run(["canplayer", "-I", str(drive)], check=True, timeout=120)
    source = drive.read_text().splitlines()
    recorded = first.stop(len(source))
    assert frames_of(recorded) == frames_of(source)
    second = Candump("vcan0", tmp_path / "again.log")
    replay(tmp_path / "from-canplayer.log")
    assert frames_of(second.stop(len(recorded))) == frames_of(recorded)


def test_can_fd_frames_stay_fd_on_mtu_72(tmp_path):
    assert Path("/sys/class/net/vcan0/mtu").read_text().strip() == "72"
    capture = tmp_path / "fd.log"
    frames = [
        can.Message(timestamp=1.0 + i * 0.001, arbitration_id=0x123 + i, is_extended_id=i % 2 == 1,
                    is_fd=True, bitrate_switch=i % 3 == 0, data=bytes(range(n)))
        for i, n in enumerate((64, 12, 48, 8, 0, 20, 64))
    ] + [can.Message(timestamp=1.1, arbitration_id=0x7FF, is_extended_id=False, data=b"\x01\x02")]
    capture.write_text("".join(format_candump(m, "vcan0") + "\n" for m in frames))
    dump = Candump("vcan0", tmp_path / "dump.log")
    replay(capture, "--no-timing")
    recorded = dump.stop(len(frames))
    assert frames_of(recorded) == frames_of(capture.read_text().splitlines())
    assert sum("##" in line for line in recorded) == 7


# --- the agent on vcan0 --------------------------------------------------------------------

def agent_config(tmp_path: Path, pki: Path, port: int, *, channel: str = "vcan0",
                 dbc: Path | None = None, mapping: Path | None = None, fd: bool = False) -> Path:
    return write_agent_config(
        tmp_path, pki, port, can=f"{{interface: socketcan, channel: {channel}, "
                                 f"fd: {str(fd).lower()}}}",
        dbc=dbc, mapping=mapping,
        policy="policy: {min_interval_s: 0, snapshot_min_interval_s: 0.5}",
        extra="logging: {stats_interval_s: 1}")


class RunningAgent:
    def __init__(self, config: Path, tmp_path: Path) -> None:
        self.log = tmp_path / "agent.log"
        self.handle = open(self.log, "w")
        self.proc = subprocess.Popen(AGENT + ["run", "--config", str(config)], cwd=ROOT,
                                     stderr=self.handle)

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text():
                return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in agent log:\n{self.log.read_text()}")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.handle.close()
        text = self.log.read_text()
        assert code == 0, text
        return text


class Collector(BaseCollector):
    """The cloud watcher's view, started at once; :meth:`stop` after the agent stopped."""

    def __init__(self, cloud_yaml: Path) -> None:
        super().__init__(cloud_yaml)
        self.start()

    def events(self) -> list[dict]:
        return sorted(self.verified(), key=lambda r: r["seq"])

    def stop(self) -> None:
        """After the agent stopped: its last message, ``offline``, has arrived."""
        assert self.wait_offline(timeout=20)
        self.watcher.stop()

    def wait_end_of_drive(self, expected: dict) -> dict:
        """Until the agent has read the whole drive and noticed the silence after it: the
        last valid values include ``expected``, and a snapshot after the last valid value
        has every signal stale. (A lagging agent may report the bus stale in the middle of
        the drive too, and a silent bus before any frame is stale: neither is the end.)"""
        def found() -> list[dict]:
            signed = self.events()
            live = [r["seq"] for r in signed if set(r["signals"]) - set(r["quality"])]
            values = last_valid(signed)
            if not live or any(values.get(k, k) != v for k, v in expected.items()):
                return []
            return [r for r in signed if r["seq"] > live[-1] and r["kind"] == "state"
                    and set(r["quality"]) == set(r["signals"])
                    and set(r["quality"].values()) == {"stale"}]
        assert wait_for(found, 60), (last_valid(self.events()), self.events()[-3:])
        return found()[0]


def last_valid(records: list[dict]) -> dict:
    """The last valid value of each signal over signed messages in seq order."""
    out = {}
    for record in records:
        for path, value in record["signals"].items():
            if path not in record["quality"]:
                out[path] = value
    return out


def offline_last_valid(capture: Path) -> dict:
    pipeline = SignalPipeline(load_vehicle(DEMO).decoder())
    out = {}
    with open_capture(capture) as reader:
        for change in pipeline.run(reader):
            if change.quality == "valid":
                out[change.path] = change.value
    return out


@pytest.mark.parametrize("feeder", ["car-agent replay", "canplayer"])
def test_agent_on_vcan_publishes_verified_state_and_transmits_nothing(
        tmp_path, pki, broker, cloud_config, drive, feeder):
    cloud = Collector(cloud_config())
    agent = RunningAgent(agent_config(tmp_path, pki, broker.port), tmp_path)
    agent.wait_for_log("uplink: connected")
    tx_before = sysfs_counter("vcan0", "tx_packets")
    if feeder == "canplayer":
        subprocess.run(["canplayer", "-I", str(drive)], check=True, timeout=120)
        sent = len(drive.read_text().splitlines())
    else:
        sent = sent_count(replay(drive))
    cloud.wait_end_of_drive(final_values(drive))
    log = agent.stop()
    tx_after = sysfs_counter("vcan0", "tx_packets")      # over the agent's whole life
    cloud.stop()
    # Every frame on vcan0's TX counter is one the feeder sent: the agent sent none.
    assert tx_after - tx_before == sent
    signed = cloud.events()
    assert [r for r in cloud.records if "rejected" in r] == []
    assert [r["seq"] for r in signed] == list(range(signed[0]["seq"], signed[-1]["seq"] + 1))
    assert last_valid(signed) == offline_last_valid(drive)      # wiring: the project's decode
    assert last_valid(signed) == final_values(drive)            # independent: decoded by hand
    # The bus went quiet after the drive: the final snapshot says so instead of stale numbers.
    final = signed[-1]
    assert final["kind"] == "state"
    assert set(final["quality"].values()) == {"stale"}
    assert "frames/s" in log


def test_agent_never_transmits_on_a_quiet_bus(tmp_path, pki, broker):
    tx_before = sysfs_counter("vcan1", "tx_packets")
    agent = RunningAgent(agent_config(tmp_path, pki, broker.port, channel="vcan1"), tmp_path)
    agent.wait_for_log("uplink: connected")
    time.sleep(2.0)
    agent.stop()
    assert sysfs_counter("vcan1", "tx_packets") == tx_before


def test_interface_down_and_up_is_survived_and_reported(tmp_path, pki, broker, cloud_config,
                                                         drive):
    cloud = Collector(cloud_config())
    agent = RunningAgent(agent_config(tmp_path, pki, broker.port), tmp_path)
    agent.wait_for_log("uplink: connected")
    replay(drive, "--end", "2")
    subprocess.run(["ip", "link", "set", "vcan0", "down"], check=True)
    agent.wait_for_log("is down")
    time.sleep(1.0)
    subprocess.run(["ip", "link", "set", "vcan0", "up"], check=True)
    agent.wait_for_log("is up again")
    before = max((r["seq"] for r in cloud.events()), default=0)
    replay(drive, "--start", "2")
    cloud.wait_end_of_drive(final_values(drive))
    log = agent.stop()
    cloud.stop()
    assert "Traceback" not in log
    after = [r for r in cloud.events() if r["seq"] > before]
    # Frames after the interface came back were decoded and published.
    assert any(r["kind"] == "event" and any(q is None for q in [r["quality"].get(p)
               for p in r["signals"]]) for r in after)
    assert last_valid(cloud.events()) == offline_last_valid(drive) == final_values(drive)


def test_gap_in_one_id_makes_its_signals_stale_then_valid(tmp_path, pki, broker, cloud_config,
                                                          drive):
    cloud = Collector(cloud_config())
    agent = RunningAgent(agent_config(tmp_path, pki, broker.port), tmp_path)
    agent.wait_for_log("uplink: connected")
    replay(drive, "--gap", "0x3D0:2:1.5", "--drop", "0.05", "--jitter", "2",
           "--flood", "3000:3:1")
    # Frames are dropped at random: only BodyStatus's last state (held for seconds) is sure.
    cloud.wait_end_of_drive({path: value for path, value in final_values(drive).items()
                             if path in DOORS or path in LOCKS})
    agent.stop()
    cloud.stop()
    fuel = "Vehicle.Powertrain.FuelSystem.RelativeLevel"
    door = "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"
    states = [(r["quality"].get(fuel, "valid")) for r in cloud.events() if fuel in r["signals"]]
    # Before the first frame the agent already reports the silent bus as stale: skip that.
    states = states[states.index("valid"):]
    # valid ... stale (the gap) ... valid again ... stale (the end of the drive)
    assert "stale" in states[1:-1] and states[0] == "valid"
    first_stale = states.index("stale")
    assert "valid" in states[first_stale:]
    # BodyStatus was not withheld: every change of the door in the drive (decoded by hand)
    # arrived, in order. (Whether it also stayed fresh throughout depends on the machine
    # keeping up with the flood in real time: not asserted.)
    door_values = [r["signals"][door] for r in cloud.events()
                   if r["kind"] == "event" and door in r["signals"] and door not in r["quality"]]
    assert [v for i, v in enumerate(door_values) if i == 0 or v != door_values[i - 1]] == \
        door_changes(drive, door)


FD_DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU
BO_ 2147484244 FdCluster: 64 ECU
 SG_ RangeKm : 0|16@1+ (1,0) [0|2000] "km" Vector__XXX
 SG_ FuelPct : 504|8@1+ (0.5,0) [0|100] "%" Vector__XXX
BA_DEF_ BO_ "VFrameFormat" ENUM "StandardCAN","ExtendedCAN","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","StandardCAN_FD","ExtendedCAN_FD";
BA_DEF_ BO_ "GenMsgCycleTime" INT 0 10000;
BA_ "VFrameFormat" BO_ 2147484244 15;
BA_ "GenMsgCycleTime" BO_ 2147484244 100;
"""


def test_agent_decodes_can_fd_frames_with_fd_enabled(tmp_path, pki, broker, cloud_config):
    dbc = tmp_path / "fd.dbc"
    dbc.write_text(FD_DBC)
    mapping = tmp_path / "fd.yaml"
    mapping.write_text("""signals:
  Vehicle.Powertrain.FuelSystem.Range: {message: FdCluster, signal: RangeKm, scale: 1000}
  Vehicle.Powertrain.FuelSystem.RelativeLevel: {message: FdCluster, signal: FuelPct}
""")
    capture = tmp_path / "fd.log"
    data = bytearray(64)
    data[0:2] = (432).to_bytes(2, "little")
    data[63] = 125                                   # 62.5 %
    frames = [can.Message(timestamp=10 + i * 0.1, arbitration_id=0x254, is_extended_id=True,
                          is_fd=True, bitrate_switch=True, data=bytes(data)) for i in range(10)]
    capture.write_text("".join(format_candump(m, "vcan0") + "\n" for m in frames))
    cloud = Collector(cloud_config())
    agent = RunningAgent(agent_config(tmp_path, pki, broker.port, dbc=dbc, mapping=mapping,
                                      fd=True), tmp_path)
    agent.wait_for_log("uplink: connected")
    replay(capture)
    expected = {"Vehicle.Powertrain.FuelSystem.Range": 432000,
                "Vehicle.Powertrain.FuelSystem.RelativeLevel": 62.5}
    wait_for(lambda: last_valid(cloud.events()) == expected, 20)
    agent.stop()
    cloud.stop()
    assert last_valid(cloud.events()) == expected
