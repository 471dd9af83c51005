"""Smoke tests for tools/vcan-vm: a User-Mode Linux guest with real SocketCAN vcan.

Each test boots a throw-away UML guest (~2.5 s).  They run from the host and
only need /usr/bin/linux.uml (apt-get install user-mode-linux kmod).
"""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VM = ROOT / "tools" / "vcan-vm"
UML = Path("/usr/bin/linux.uml")
VENV_PY = ROOT / ".venv" / "bin" / "python"
PY = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))

pytestmark = [
    pytest.mark.vcan,
    pytest.mark.skipif(not UML.exists(),
                       reason="/usr/bin/linux.uml missing: apt-get install user-mode-linux kmod"),
]


def run_vm(*args, env=None, timeout=60):
    return subprocess.run([str(VM), *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def test_exit_status_stdout_and_stderr():
    r = run_vm("--", "sh", "-c", "echo hello; echo oops >&2; exit 7")
    assert r.returncode == 7, r
    assert r.stdout == "hello\n"
    assert r.stderr == "oops\n"


def test_environment_cwd_and_tmp_pass_through(tmp_path):
    env = dict(os.environ, CAR_AGENT_PROBE="it's $here \"quoted\"", TMPDIR=str(tmp_path))
    script = ('printf "probe=%s\\n" "$CAR_AGENT_PROBE"; echo "cwd=$(pwd)"; echo "vm=$VCAN_VM"; '
              'echo "tmpdir=${TMPDIR-unset}"; echo "tmpfs=$(stat -f -c %T /tmp)"; '
              'echo written > .vm/probe-$$ && cat .vm/probe-$$ && rm .vm/probe-$$')
    r = run_vm("--", "sh", "-c", script, env=env)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert "probe=it's $here \"quoted\"" in lines
    assert f"cwd={ROOT}" in lines
    assert "vm=1" in lines
    assert "tmpdir=unset" in lines          # guest /tmp is its own tmpfs
    assert "tmpfs=tmpfs" in lines
    assert "written" in lines               # the checkout is mounted read-write


def test_setup_error_exits_2():
    env = dict(os.environ, VCAN_VM_KERNEL="/nonexistent/linux.uml")
    r = run_vm("--", "true", env=env)
    assert r.returncode == 2
    assert "/nonexistent/linux.uml not found" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_real_kernel_vcan_interfaces():
    r = run_vm("--", "sh", "-c", "ip -details link show vcan0; ip -details link show vcan1")
    assert r.returncode == 0, r
    for dev in ("vcan0", "vcan1"):
        assert f"{dev}: <NOARP,UP,LOWER_UP>" in r.stdout
    assert r.stdout.count("link/can") == 2
    assert "\n    vcan " in r.stdout          # the -details line naming the link type


ROUND_TRIP = """
import can, sys
fd = sys.argv[1] == "fd"
data = bytes(range(64)) if fd else bytes([0xDE, 0xAD, 0xBE, 0xEF])
with can.Bus(interface="socketcan", channel="vcan0", fd=fd) as rx, \\
        can.Bus(interface="socketcan", channel="vcan0", fd=fd) as tx:
    tx.send(can.Message(arbitration_id=0x1AB, data=data, is_extended_id=False,
                        is_fd=fd, bitrate_switch=fd))
    m = rx.recv(timeout=5)
    print("RX", hex(m.arbitration_id), m.dlc, m.is_fd, m.data.hex())
"""


def test_python_can_round_trip():
    r = run_vm("--", PY, "-c", ROUND_TRIP, "classic")
    assert r.returncode == 0, r
    assert r.stdout.strip() == "RX 0x1ab 4 False deadbeef"


def test_python_can_fd_round_trip():
    r = run_vm("--", "sh", "-c", 'ip link set vcan0 mtu 72 && exec "$@"', "sh",
               PY, "-c", ROUND_TRIP, "fd")
    assert r.returncode == 0, r
    assert r.stdout.strip() == "RX 0x1ab 64 True " + bytes(range(64)).hex()


@pytest.mark.skipif(not (shutil.which("candump") and shutil.which("cansend")),
                    reason="can-utils not installed")
def test_can_utils_round_trip():
    script = ("candump -n 1 -T 10000 vcan1 & sleep 1; cansend vcan1 1F334455#1122334455667788; "
              "wait")
    r = run_vm("--", "sh", "-c", script)
    assert r.returncode == 0, r
    assert r.stdout.split() == ["vcan1", "1F334455", "[8]", "11", "22", "33", "44", "55",
                                "66", "77", "88"]


def _uml_processes(umid):
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"umid={umid}".encode() in cmd.split(b"\0"):
            found.append(int(d.name))
    return found


def test_sigterm_leaves_nothing_running():
    p = subprocess.Popen([str(VM), "-v", "--", "sh", "-c", "echo ready; exec sleep 300"],
                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in p.stdout], daemon=True)
    reader.start()
    umid = None
    deadline = time.monotonic() + 30
    try:
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "umid=" in line:
                umid = line.split("umid=")[1].split()[0]
            if line.strip() == "ready":
                break
        assert umid and _uml_processes(umid), "no linux.uml process found for this run"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == -signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        reader.join(timeout=10)         # EOF once every process holding the pipe is gone
        p.stdout.close()
    assert not reader.is_alive(), "something still holds the wrapper's stdout"
    time.sleep(0.2)
    assert _uml_processes(umid) == []
    assert not (ROOT / ".vm" / umid).exists()      # scratch dir removed
