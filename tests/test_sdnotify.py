"""agent.service.sdnotify against real unix datagram sockets (a path in tmp_path and an abstract one)."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from agent.service import sdnotify
from agent.service.sdnotify import Notifier
from support.waiting import ManualClock


def _bound(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def manager(tmp_path: Path):
    """A fake service manager socket bound in tmp_path: (NOTIFY_SOCKET value, socket)."""
    path = tmp_path / "notify.sock"
    sock = _bound(str(path))
    try:
        yield str(path), sock
    finally:
        sock.close()


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    sock.settimeout(0.0)
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return got


def test_ready_with_status(manager) -> None:
    address, sock = manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert notifier.ready("vehicle VIN1: 12 signals")
    assert sock.recv(4096) == b"READY=1\nSTATUS=vehicle VIN1: 12 signals"
    notifier.close()


def test_status_stopping_and_newlines_are_flattened(manager) -> None:
    address, sock = manager
    with Notifier.from_environ({"NOTIFY_SOCKET": address}) as notifier:
        notifier.status("line one\nline two")
        notifier.stopping()
        notifier.ready()
        notifier.extend_timeout(2.5)
        assert sock.recv(4096) == b"STATUS=line one line two"
        assert sock.recv(4096) == b"STOPPING=1"
        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"


def test_abstract_socket() -> None:
    name = f"car-agent-test-{uuid.uuid4().hex}"
    sock = _bound(b"\0" + name.encode())
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        notifier.close()
    finally:
        sock.close()


def test_watchdog_is_rate_limited(manager, monkeypatch) -> None:
    address, sock = manager
    clock = ManualClock()                     # the module's monotonic clock, moved by hand
    monkeypatch.setattr(sdnotify, "time", clock)
    # 0.4 s interval: at most one WATCHDOG=1 per 0.1 s however often watchdog() is called.
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000",
                                      "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == pytest.approx(0.4)
    sent = []
    for step in (0.0, 0.05, 0.049, 0.002, 0.099, 0.002, 1.0):
        clock.advance(step)
        for _ in range(1000):                 # hammered at one instant ...
            notifier.watchdog()
        sent.append(len(_drain(sock)))
    # ... but sent at once, then only when 0.1 s passed since the last one.
    assert sent == [1, 0, 0, 1, 0, 1, 1]
    notifier.close()


def test_watchdog_first_call_sends_immediately(manager) -> None:
    address, sock = manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"})
    notifier.watchdog()
    notifier.watchdog()
    assert _drain(sock) == [b"WATCHDOG=1"]
    notifier.close()


@pytest.mark.parametrize("env", [
    {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},          # someone else's watchdog
    {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "not-a-pid"},
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "soon"},
    {},
])
def test_watchdog_not_for_us(manager, env) -> None:
    address, sock = manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, **env}, pid=4242)
    assert notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.watchdog()
    assert _drain(sock) == []
    notifier.ready()          # notifications other than the watchdog still go out
    assert _drain(sock) == [b"READY=1"]
    notifier.close()


def test_watchdog_pid_matching_ours_given_explicitly(manager) -> None:
    address, _ = manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000",
                                      "WATCHDOG_PID": "4242"}, pid=4242)
    assert notifier.watchdog_interval_s == pytest.approx(0.2)
    notifier.close()


def test_no_socket_is_a_noop(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    notifier = Notifier.from_environ()
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    notifier.watchdog()
    notifier.close()


def test_unsupported_address_is_a_noop(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="car_agent.sdnotify"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "not a unix socket path" in caplog.text


def test_socket_gone_never_raises_and_logs_once(tmp_path: Path, caplog) -> None:
    path = tmp_path / "gone.sock"
    sock = _bound(str(path))
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000"})
    assert notifier.ready()
    sock.close()
    path.unlink()
    with caplog.at_level(logging.DEBUG, logger="car_agent.sdnotify"):
        assert notifier.ready("again") is False
        assert notifier.status("still nobody") is False
        for _ in range(3):
            notifier.watchdog()
            time.sleep(0.002)
        notifier.stopping()
    failures = [r for r in caplog.records if "cannot send" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG
    notifier.close()


def test_socket_unbound_but_file_left_behind_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    sock = _bound(str(path))
    sock.close()               # the file stays, nobody listens: ECONNREFUSED
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert notifier.ready() is False
    notifier.close()
