"""The real daemon under systemd's protocol: READY=1, WATCHDOG=1 from the main loop, STATUS=,
STOPPING=1, journald-style logging; and the refusal of careless key files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.dev.simulate import write_capture
from agent.signals.vehicle import load_vehicle
from support.agent_run import write_agent_config
from support.notify import NotifySocket
from support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo.yaml"

pytestmark = pytest.mark.mqtt


def write_config(tmp_path: Path, pki: Path, port: int, capture: Path, *,
                 signing_key: Path | None = None) -> Path:
    return write_agent_config(tmp_path, pki, port, capture=capture, realtime=True,
                              signing_key=signing_key,
                              extra="logging: {stats_interval_s: 1, mask_vin: true}")


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (``T``: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def test_ready_watchdog_status_stopping_over_a_real_notify_socket(tmp_path, pki, broker):
    capture = tmp_path / "drive.log"
    write_capture(load_vehicle(DEMO), capture, 30.0, seed=9)
    config = write_config(tmp_path, pki, broker.port, capture)
    with NotifySocket(tmp_path) as manager:
        env = {**os.environ, **manager.env(watchdog_usec=1_000_000), "JOURNAL_STREAM": "8:1234"}
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                 env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            ready = manager.wait_for("READY", "1", timeout=20)
            assert ready.pid == agent.pid              # NotifyAccess=main holds
            assert "signals" in ready.get("STATUS", "")
            pings = manager.wait_count("WATCHDOG", 4, timeout=30)
            assert {p.pid for p in pings} == {agent.pid}
            # stats_interval_s is 1: a STATUS= with the rate and the queue follows.
            manager.wait_until(lambda notes: any(
                "frames/s" in n.get("STATUS", "") and "queued" in n.get("STATUS", "")
                for n in notes), timeout=30)
            # A stuck main loop stops pinging: this is what systemd's watchdog acts on.
            agent.send_signal(signal.SIGSTOP)
            assert wait_for(lambda: process_state(agent.pid) == "T")
            manager.collect(0.2)                       # what it sent before it stopped
            assert manager.collect(2.0, "WATCHDOG") == []
            agent.send_signal(signal.SIGCONT)
            seen = len([n for n in manager.messages if "WATCHDOG" in n])
            manager.wait_count("WATCHDOG", seen + 1, timeout=30)
            agent.send_signal(signal.SIGTERM)
            manager.wait_for("STOPPING", "1", timeout=20)
            _, stderr = agent.communicate(timeout=60)
        finally:
            if agent.poll() is None:
                agent.kill()
    assert agent.returncode == 0, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    # journald style: a syslog priority prefix, no timestamp of our own (the journal adds it).
    assert all(line.startswith(("<3>", "<4>", "<6>", "<7>")) for line in lines[:-1]), lines[:5]
    assert any(line.startswith("<6>car_agent.daemon: stats:") for line in lines)
    assert not any(line[3:7].isdigit() and line[7] == "-" for line in lines)
    # logging.mask_vin: the vehicle id does not appear in the log, its masked form does.
    assert not any("VIN1" in line for line in lines[:-1])
    assert any("***1" in line for line in lines)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_readable_by_others_is_refused_with_its_mode(tmp_path, pki, broker, mode):
    key = tmp_path / "signing.key"
    shutil.copy2(pki / "VIN1.signing.key", key)
    os.chmod(key, mode)
    capture = tmp_path / "drive.log"
    write_capture(load_vehicle(DEMO), capture, 1.0, seed=1)
    config = write_config(tmp_path, pki, broker.port, capture, signing_key=key)
    result = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(key) in lines[0] and f"mode {mode:04o}" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_missing_can_interface_is_transient_exit_75(tmp_path, pki):
    """Not there yet (or no SocketCAN at all): exit 75 so systemd retries; a config mistake
    exits 2, which the unit's RestartPreventExitStatus=2 does not restart."""
    capture = tmp_path / "unused.log"
    config = write_config(tmp_path, pki, 1883, capture)
    text = config.read_text().replace(f"{{capture: {capture}, realtime: true}}",
                                      "{interface: socketcan, channel: vcan9}")
    config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 75, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("car-agent run: error: can: cannot open socketcan vcan9")
    assert "Traceback" not in result.stderr
