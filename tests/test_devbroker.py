"""Tests for agent.devbroker: a real mosquitto with mTLS and per-vehicle ACLs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import agent.dev.broker as devbroker
from agent.dev.broker import DevBroker, free_port
from support.waiting import wait_for

NOT_AUTHORIZED = 0x87


def _process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_config_files(broker: DevBroker, pki: Path) -> None:
    conf = broker.conf_path.read_text()
    for line in ("per_listener_settings false", "allow_anonymous false", "persistence false",
                 "require_certificate true", "use_identity_as_username true",
                 "tls_version tlsv1.2", f"listener {broker.port} 127.0.0.1",
                 f"cafile {pki.resolve() / 'ca.crt'}", f"acl_file {broker.acl_path}"):
        assert line in conf.splitlines()
    assert any(line.startswith("user ") for line in conf.splitlines())
    acl = broker.acl_path.read_text().splitlines()
    for line in ("pattern write vehicles/%u/+", "pattern write vehicles/%u/snapshot/+",
                 "pattern read vehicles/%u/cmd/#"):
        assert line in acl
    cloud = acl.index("user cloud")
    assert acl[cloud + 1:cloud + 4] == ["topic read vehicles/+/+",
                                        "topic read vehicles/+/snapshot/+",
                                        "topic write vehicles/+/cmd/#"]
    assert "mosquitto version" in broker.log_text() and "running" in broker.log_text()


def test_vehicle_publishes_to_own_prefix_only(broker: DevBroker, mqtt_client) -> None:
    vin1 = mqtt_client("VIN1")
    ok = vin1.publish("vehicles/VIN1/x", b"hello")
    assert not ok.is_failure
    denied = vin1.publish("vehicles/VIN2/x", b"hello")
    assert denied.is_failure
    assert denied.value == NOT_AUTHORIZED
    assert "Not authorized" in str(denied)


def test_cloud_cannot_publish(broker: DevBroker, mqtt_client) -> None:
    cloud = mqtt_client("cloud")
    assert cloud.publish("vehicles/VIN1/state", b"forged").value == NOT_AUTHORIZED


def test_kill_and_restart_on_same_port(broker: DevBroker, mqtt_client) -> None:
    port, pid = broker.port, broker.pid
    broker.kill()
    assert not broker.running()
    assert _process_gone(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    broker.restart()
    assert broker.port == port and broker.pid != pid
    assert not mqtt_client("VIN1").publish("vehicles/VIN1/x", b"again").is_failure
    assert broker.log_text().count(" running") == 2  # the log spans both runs


def test_stop_leaves_no_process(pki: Path, tmp_path: Path) -> None:
    if devbroker.find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with DevBroker(pki, tmp_path) as dev:
        pid, port = dev.pid, dev.port
        assert dev.running()
    assert _process_gone(pid)
    assert not dev.running()
    dev.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_reload_rereads_config(broker: DevBroker) -> None:
    before = broker.log_text().count("Reloading config")
    broker.reload()
    assert wait_for(lambda: broker.log_text().count("Reloading config") > before)
    assert broker.running()


def test_port_in_use_is_retried(pki: Path, tmp_path: Path, monkeypatch) -> None:
    if devbroker.find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = devbroker.free_port
    monkeypatch.setattr(devbroker, "free_port", lambda host: next(ports, None) or real(host))
    try:
        with DevBroker(pki, tmp_path) as dev:
            assert dev.port != taken.getsockname()[1]
            assert "Address already in use" in dev.log_text()
    finally:
        taken.close()


def test_startup_failure_reports_log(pki: Path, tmp_path: Path) -> None:
    if devbroker.find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    dev = DevBroker(pki, tmp_path, extra_conf="no_such_option 1")
    with pytest.raises(RuntimeError, match="(?s)exited with status .*no_such_option"):
        dev.start()
    assert not dev.running()


def test_missing_mosquitto(pki: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(devbroker, "find_mosquitto", lambda: None)
    with pytest.raises(RuntimeError, match="mosquitto not found: apt-get install mosquitto"):
        DevBroker(pki, tmp_path).start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_broker_dies_with_its_parent(pki: Path, tmp_path: Path) -> None:
    if devbroker.find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    script = textwrap.dedent(f"""
        import sys, time
        from agent.dev.broker import DevBroker
        dev = DevBroker({str(pki)!r}, {str(tmp_path)!r}).start()
        print(dev.pid, flush=True)
        time.sleep(60)
    """)
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=root, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert not _process_gone(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        parent.stdout.close()
    assert wait_for(lambda: _process_gone(pid)), "mosquitto outlived its parent"
    if not _process_gone(pid):  # pragma: no cover - clean up if the assertion lied
        os.kill(pid, signal.SIGKILL)
