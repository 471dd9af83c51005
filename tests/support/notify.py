"""A fake systemd service manager: the ``NOTIFY_SOCKET`` side of sd_notify, across processes.

:class:`NotifySocket` is a unix datagram socket whose path is given to a child as
``NOTIFY_SOCKET``; it records every datagram with the sender's pid (from ``SCM_CREDENTIALS``,
as systemd does to enforce ``NotifyAccess=main``).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

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

    def wait_until(self, predicate, timeout: float = 10.0) -> list[Notification]:
        """Receive until ``predicate(every datagram so far)`` holds; fail the test with the
        last datagrams after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                got = [n.raw for n in self.messages][-20:]
                raise AssertionError(f"not within {timeout:g} s; received: {got}")
            self.recv(left)
        return self.messages

    def wait_count(self, key: str, count: int, timeout: float = 10.0) -> list[Notification]:
        """Receive until ``count`` datagrams with ``key`` arrived; all of them so far."""
        self.wait_until(lambda notes: sum(key in n for n in notes) >= count, timeout)
        return [n for n in self.messages if key in n]

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
