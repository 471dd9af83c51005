"""Readiness and watchdog as a service manager sees them, across processes.

:class:`NotifySocket` plays systemd's side of the protocol: a unix datagram socket whose path is
given to a child as ``NOTIFY_SOCKET``; it records every datagram with the sender's pid (from
``SCM_CREDENTIALS``, as systemd does to enforce ``NotifyAccess=main``). It is meant to be reused
for the real daemon (``car-agent run`` as the child).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_UCRED = struct.Struct("iII")      # struct ucred: pid_t pid; uid_t uid; gid_t gid


@dataclass
class Notification:
    """One datagram: its ``KEY=value`` assignments, sender pid (None if unknown), arrival time."""

    fields: dict[str, str]
    pid: int | None
    at: float = field(default_factory=time.monotonic)
    raw: bytes = b""

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)


class NotifySocket:
    """A fake service manager: bind in ``directory``, receive with timeouts, keep everything.

    >>> with NotifySocket(tmp_path) as manager:
    ...     child = subprocess.Popen(cmd, env={**os.environ, **manager.env(watchdog_usec=200_000)})
    ...     manager.wait_for("READY", "1", timeout=10)
    ...     pings = manager.collect(3.0, "WATCHDOG")
    """

    def __init__(self, directory: Path, name: str = "notify.sock") -> None:
        self.path = Path(directory) / name
        self.messages: list[Notification] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        # Ask the kernel for the sender's credentials with every datagram.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    # -- environment for the child ----------------------------------------------------------
    def env(self, watchdog_usec: int | None = None, watchdog_pid: int | None = None) -> dict[str, str]:
        """What systemd would set: NOTIFY_SOCKET, and WATCHDOG_USEC/WATCHDOG_PID if given."""
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        if watchdog_pid is not None:
            env["WATCHDOG_PID"] = str(watchdog_pid)
        return env

    # -- receiving --------------------------------------------------------------------------
    def recv(self, timeout: float) -> Notification | None:
        """The next datagram within ``timeout`` seconds, or None."""
        self.sock.settimeout(max(timeout, 0.0) or 1e-6)
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(_UCRED.size))
        except (socket.timeout, BlockingIOError):
            return None
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[:_UCRED.size])[0]
        fields: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        note = Notification(fields, pid, time.monotonic(), data)
        self.messages.append(note)
        return note

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> Notification:
        """The first datagram (already received or arriving within ``timeout``) with ``key``
        (equal to ``value`` if given); fails the test with what did arrive otherwise."""
        for note in self.messages:
            if key in note and (value is None or note.get(key) == value):
                return note
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            note = self.recv(left)
            if note is not None and key in note and (value is None or note.get(key) == value):
                return note
        got = [n.raw for n in self.messages][-20:]
        raise AssertionError(f"no {key}{'=' + value if value is not None else ''} within "
                             f"{timeout:g} s; received: {got}")

    def collect(self, duration: float, key: str | None = None) -> list[Notification]:
        """Everything arriving during ``duration`` seconds (only those with ``key`` if given)."""
        deadline = time.monotonic() + duration
        got: list[Notification] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            note = self.recv(left)
            if note is not None and (key is None or key in note):
                got.append(note)
        return got

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "NotifySocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A stand-in service: ready after start-up, then a busy main loop calling watchdog() on every
# iteration (as the daemon does), STOPPING=1 on SIGTERM.
CHILD = textwrap.dedent("""
    import signal, sys, time
    from agent.service.sdnotify import Notifier

    stop = False
    def on_term(*_):
        global stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)

    notifier = Notifier.from_environ()
    print(notifier.watchdog_interval_s, flush=True)
    time.sleep(0.2)                       # "start-up"
    notifier.ready("child up")
    while not stop:
        notifier.watchdog()
        time.sleep(0.01)                  # one loop iteration
    notifier.stopping()
    sys.exit(0)
""")


@pytest.fixture
def manager(tmp_path: Path):
    with NotifySocket(tmp_path) as sock:
        yield sock


def _spawn(extra_env: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env)
    return subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(child: subprocess.Popen) -> tuple[int, str, str]:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        out, err = child.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    return child.returncode, out, err


def test_ready_then_watchdog_cadence_then_stopping(manager: NotifySocket) -> None:
    child = _spawn(manager.env(watchdog_usec=200_000))   # WatchdogSec=0.2
    try:
        ready = manager.wait_for("READY", "1", timeout=15)
        assert ready.get("STATUS") == "child up"
        assert ready.pid == child.pid                     # NotifyAccess=main would accept it
        pings = manager.collect(3.0, "WATCHDOG")
    finally:
        code, out, err = _stop(child)
    assert code == 0, err
    assert out.strip() == "0.2"                           # the child saw the interval
    assert all(p.get("WATCHDOG") == "1" and p.pid == child.pid for p in pings)
    # A manager with WatchdogSec=0.2 needs a ping every 0.2 s: at least 15 in 3 s. The child
    # calls watchdog() ~300 times in that time; rate-limited to one per 0.05 s that is ~60.
    assert len(pings) >= 15, f"only {len(pings)} WATCHDOG=1 in 3 s"
    assert len(pings) <= 100, f"{len(pings)} WATCHDOG=1 in 3 s: not rate-limited"
    stopping = manager.wait_for("STOPPING", "1", timeout=5)
    assert stopping.pid == child.pid


def test_watchdog_meant_for_another_pid_is_not_pinged(manager: NotifySocket) -> None:
    # WATCHDOG_PID names another process (e.g. we are a child that inherited the environment).
    child = _spawn(manager.env(watchdog_usec=200_000, watchdog_pid=1))
    try:
        manager.wait_for("READY", "1", timeout=15)
        pings = manager.collect(1.0, "WATCHDOG")
    finally:
        code, out, err = _stop(child)
    assert code == 0, err
    assert out.strip() == "None"
    assert pings == []


def test_no_watchdog_without_watchdog_usec(manager: NotifySocket) -> None:
    child = _spawn(manager.env())
    try:
        manager.wait_for("READY", "1", timeout=15)
        pings = manager.collect(0.5, "WATCHDOG")
    finally:
        code, _, err = _stop(child)
    assert code == 0, err
    assert pings == []
