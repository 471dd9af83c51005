"""A throw-away local mosquitto with mutual TLS, for tests and ``make demo``.

DEVELOPMENT ONLY. It writes a mosquitto config and ACL into a work directory, starts
``mosquitto -c`` on a free loopback port and captures its log. The broker:

* accepts only clients with a certificate from the dev CA (``require_certificate``) and
  takes the certificate's CN as the user name (``use_identity_as_username``);
* lets each vehicle publish only its own ``vehicles/<CN>/<leaf>`` and snapshot answers
  ``vehicles/<CN>/snapshot/<requester>``, and read only its own ``vehicles/<CN>/cmd/#``;
  user ``cloud`` reads what vehicles publish and alone may publish requests to
  ``vehicles/+/cmd/#``;
* keeps nothing on disk (``persistence false``) and logs everything to its stderr.

The child is asked to die with the thread that started it (``PR_SET_PDEATHSIG``), so a
crashed test run leaves no broker holding a port.

Example::

    with DevBroker(pki_dir, workdir) as broker:
        print(broker.port)
"""

from __future__ import annotations

import collections
import ctypes
import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["DevBroker", "find_mosquitto", "free_port"]

#: Lines of mosquitto output kept in memory (``log_type all`` logs every packet).
LOG_LINES_KEPT = 20_000
_PORT_ATTEMPTS = 5
_PR_SET_PDEATHSIG = 1


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    fallback = "/usr/sbin/mosquitto"
    return fallback if os.access(fallback, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return getpass.getuser()


def _death_signal_preexec() -> "Callable[[], None] | None":
    """A preexec_fn that makes the child receive SIGTERM when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody will signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _Run:
    """One mosquitto process and the thread draining its output."""

    def __init__(self, proc: subprocess.Popen, sink: "DevBroker") -> None:
        self.proc = proc
        self.ready = threading.Event()
        self.eof = threading.Event()
        self.lines: list[str] = []  # output of this process only (for start-up errors)
        self._sink = sink
        self.thread = threading.Thread(
            target=self._drain, name=f"mosquitto-{proc.pid}-log", daemon=True
        )
        self.thread.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not self.ready.is_set():
                    self.lines.append(line)
                    if " running" in line:
                        self.ready.set()
                self._sink._append_log(line)
        except (OSError, ValueError):
            pass  # pipe closed under us by stop()
        finally:
            self.eof.set()


class DevBroker:
    """A local mosquitto with mTLS and per-vehicle ACLs. Use as a context manager.

    :param pki_dir: directory made by :func:`agent.pki.init_pki` (``ca.crt``,
        ``broker.crt``, ``broker.key``).
    :param workdir: where ``mosquitto.conf`` and ``acl`` are written (created if needed).
    :param extra_conf: appended to the config after the listener settings (e.g. ``crlfile``).
    :param acl_extra: appended to the ACL file.
    """

    def __init__(
        self,
        pki_dir: Path | str,
        workdir: Path | str,
        *,
        host: str = "127.0.0.1",
        extra_conf: str = "",
        acl_extra: str = "",
    ) -> None:
        self.pki_dir = Path(pki_dir).resolve()
        self.workdir = Path(workdir).resolve()
        self.host = host
        self.extra_conf = extra_conf
        self.acl_extra = acl_extra
        self.conf_path = self.workdir / "mosquitto.conf"
        self.acl_path = self.workdir / "acl"
        self._port: int | None = None
        self._run: _Run | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._log_lock = threading.Lock()

    # ------------------------------------------------------------------ public API

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("DevBroker has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        return self._run.proc.pid if self._run is not None else None

    def running(self) -> bool:
        return self._run is not None and self._run.proc.poll() is None

    def start(self, timeout: float = 10) -> "DevBroker":
        """Start on a fresh free port; return once mosquitto logs that it is running.

        :raises RuntimeError: mosquitto missing, or it exited (the message has its last log lines).
        """
        if self.running():
            raise RuntimeError(f"DevBroker already running on port {self._port}")
        last_error: RuntimeError | None = None
        for _ in range(_PORT_ATTEMPTS):
            self._port = free_port(self.host)
            try:
                self._launch(timeout)
                return self
            except _AddressInUse as exc:
                last_error = exc  # someone took the port between probe and bind
        assert last_error is not None
        raise last_error

    def restart(self, timeout: float = 10) -> "DevBroker":
        """Start again on the same port (after :meth:`kill` or :meth:`stop`)."""
        if self._port is None:
            return self.start(timeout)
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._launch(max(0.1, deadline - time.monotonic()))
                return self
            except _AddressInUse:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``. Idempotent."""
        run, self._run = self._run, None
        if run is None:
            return
        if run.proc.poll() is None:
            run.proc.terminate()
            try:
                run.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
        self._finish(run)

    def kill(self) -> None:
        """SIGKILL, as in a crash (for outage tests). :meth:`restart` brings it back."""
        run, self._run = self._run, None
        if run is None:
            return
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.wait()
        self._finish(run)

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its config (e.g. a rewritten CRL file)."""
        if not self.running():
            raise RuntimeError("DevBroker is not running")
        assert self._run is not None
        self._run.proc.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        """mosquitto's output so far (the last LOG_LINES_KEPT lines, all runs)."""
        with self._log_lock:
            return "\n".join(self._log) + ("\n" if self._log else "")

    def __enter__(self) -> "DevBroker":
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        return f"DevBroker({self.host}:{self._port}, {state})"

    # ------------------------------------------------------------------ internals

    def _append_log(self, line: str) -> None:
        with self._log_lock:
            self._log.append(line)

    def _write_files(self) -> None:
        for path in (self.pki_dir, self.workdir):
            if any(c.isspace() for c in str(path)):
                raise RuntimeError(f"{path}: mosquitto config paths must not contain whitespace")
        for name in ("ca.crt", "broker.crt", "broker.key"):
            if not (self.pki_dir / name).is_file():
                raise RuntimeError(f"{self.pki_dir / name}: missing (run agent.pki.init_pki first)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        acl = [
            "# written by agent.devbroker (development only)",
            "# each vehicle (certificate CN) publishes under vehicles/<CN>/ (but never to its",
            "# cmd/ topics) and reads only its own requests",
            "pattern write vehicles/%u/+",
            "pattern write vehicles/%u/snapshot/+",
            "pattern read vehicles/%u/cmd/#",
            "",
            "# the cloud reads what vehicles publish (not the requests) and alone sends requests",
            "user cloud",
            "topic read vehicles/+/+",
            "topic read vehicles/+/snapshot/+",
            "topic write vehicles/+/cmd/#",
            "",
            self.acl_extra,
            "",
        ]
        self.acl_path.write_text("\n".join(acl), encoding="utf-8")
        conf = [
            "# written by agent.devbroker (development only)",
            "per_listener_settings false",
            "allow_anonymous false",
            "persistence false",
            "log_dest stderr",
            "log_type all",
            "log_timestamp true",
            # As root mosquitto would switch to user 'mosquitto' before reading key and ACL.
            f"user {_current_user()}",
            f"acl_file {self.acl_path}",
            "",
            f"listener {self._port} {self.host}",
            f"cafile {self.pki_dir / 'ca.crt'}",
            f"certfile {self.pki_dir / 'broker.crt'}",
            f"keyfile {self.pki_dir / 'broker.key'}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            "",
            self.extra_conf,
            "",
        ]
        self.conf_path.write_text("\n".join(conf), encoding="utf-8")

    def _launch(self, timeout: float) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto not found: apt-get install mosquitto")
        self._write_files()
        proc = subprocess.Popen(
            [binary, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_death_signal_preexec(),  # noqa: PLW1509 - only calls prctl
            close_fds=True,
        )
        run = _Run(proc, self)
        deadline = time.monotonic() + timeout
        while not run.ready.is_set():
            if run.eof.wait(0.01) and not run.ready.is_set():
                proc.wait()
                self._finish(run)
                tail = "\n".join(run.lines[-15:])
                if any("Address already in use" in line for line in run.lines):
                    raise _AddressInUse(f"port {self._port} is in use:\n{tail}")
                raise RuntimeError(
                    f"mosquitto exited with status {proc.returncode} while starting:\n{tail}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                self._finish(run)
                tail = "\n".join(run.lines[-15:])
                raise RuntimeError(f"mosquitto did not report 'running' within {timeout:g} s:\n{tail}")
        self._run = run

    @staticmethod
    def _finish(run: _Run) -> None:
        run.thread.join(2)
        if run.proc.stdout is not None:
            run.proc.stdout.close()


class _AddressInUse(RuntimeError):
    """mosquitto could not bind its port."""
