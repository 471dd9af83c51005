"""The systemd notification protocol (``sd_notify``), stdlib only.

systemd (or any service manager speaking the protocol) passes the address of a Unix datagram
socket in ``NOTIFY_SOCKET``; the service sends newline-separated ``KEY=value`` assignments to it
(``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). An address starting with ``@`` is
in the abstract namespace (the ``@`` stands for a leading NUL byte).

With ``WatchdogSec=`` the manager sets ``WATCHDOG_USEC`` (the interval, in microseconds) and
``WATCHDOG_PID``; the watchdog applies to this process only if ``WATCHDOG_PID`` is unset or is
our own pid (so a child that inherited the environment does not ping for its parent).

Everything here is a no-op without ``NOTIFY_SOCKET``, and a failed send never raises (it is
logged once, at debug level): a service manager that went away must not stop the agent.
:meth:`Notifier.watchdog` is meant to be called on every iteration of the main loop; it sends at
most once per quarter of the watchdog interval and otherwise costs one clock read and one
comparison.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("car_agent.sdnotify")

#: A send blocks at most this long (only if the manager stops reading its socket).
SEND_TIMEOUT_S = 1.0


class Notifier:
    """Sends notifications to the service manager, if there is one.

    Build it with :meth:`from_environ`; the constructor takes the values explicitly (tests).
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._failed_logged = False
        self._watchdog_period: float | None = None
        self._watchdog_interval_s: float | None = None
        self._next_watchdog = 0.0
        if address:
            self._address = _socket_address(address)
        if self._address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(SEND_TIMEOUT_S)
            except OSError as exc:
                log.debug("sd_notify: cannot create a unix datagram socket: %s", exc)
                self._address = None
                self._sock = None
        if self._sock is not None and watchdog_usec is not None and watchdog_usec > 0:
            self._watchdog_interval_s = watchdog_usec / 1_000_000
            # The manager recommends pinging at half the interval; a quarter leaves room for a
            # slow iteration of the caller's loop.
            self._watchdog_period = self._watchdog_interval_s / 4

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     pid: int | None = None) -> "Notifier":
        """A notifier for ``NOTIFY_SOCKET``/``WATCHDOG_USEC``/``WATCHDOG_PID`` of ``environ``
        (default ``os.environ``); ``pid`` defaults to ``os.getpid()``."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec = _watchdog_usec(env, os.getpid() if pid is None else pid)
        return cls(address, watchdog_usec)

    # -- properties -------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True if there is a service manager to notify."""
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """The manager's watchdog interval in seconds, or None if no watchdog applies to us."""
        return self._watchdog_interval_s

    # -- messages ---------------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """Start-up finished (``READY=1``), optionally with a status line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", "STATUS=" + _one_line(status))

    def status(self, text: str) -> bool:
        """A free-form one-line status shown by ``systemctl status``."""
        return self.notify("STATUS=" + _one_line(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (``STOPPING=1``)."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", "STATUS=" + _one_line(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start/stop times out
        (``EXTEND_TIMEOUT_USEC``), e.g. while draining the outbox on the way out."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog(self) -> None:
        """Keep-alive (``WATCHDOG=1``); cheap enough to call on every loop iteration.

        Sends at most once per ``watchdog_interval_s / 4``; does nothing without a watchdog.
        """
        period = self._watchdog_period
        if period is None:
            return
        now = time.monotonic()
        if now < self._next_watchdog:
            return
        self._next_watchdog = now + period
        self._send(b"WATCHDOG=1")

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True if it was sent."""
        if self._sock is None:
            return False
        return self._send("\n".join(assignments).encode("utf-8", "replace"))

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._watchdog_period = None
        if sock is not None:
            sock.close()

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _send(self, data: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendto(data, self._address)
            return True
        except OSError as exc:   # gone, refused, too long, timed out: never fatal
            if not self._failed_logged:
                self._failed_logged = True
                log.debug("sd_notify: cannot send to %s: %s (further failures not logged)",
                          _printable(self._address), exc)
            return False


def _socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None if unsupported."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    # systemd >= 253 also knows vsock:CID:PORT (for VMs); a head unit runs us on the host.
    log.warning("sd_notify: NOTIFY_SOCKET=%r is not a unix socket path or abstract name; "
                "not notifying the service manager", value)
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` if the watchdog is meant for ``pid``, else None."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.debug("sd_notify: ignoring WATCHDOG_USEC=%r (not an integer)", raw)
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None      # set for another process (we inherited it)
        except ValueError:
            log.debug("sd_notify: ignoring the watchdog: WATCHDOG_PID=%r is not a pid", owner)
            return None
    return usec


def _one_line(text: str) -> str:
    """A value may not contain a newline: it would start the next assignment."""
    return text.replace("\r", " ").replace("\n", " ")


def _printable(address: str | bytes | None) -> str:
    if isinstance(address, bytes):
        return "@" + os.fsdecode(address[1:]) if address.startswith(b"\0") else os.fsdecode(address)
    return str(address)
