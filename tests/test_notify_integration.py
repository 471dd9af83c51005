"""Readiness and watchdog as a service manager sees them, across processes
(:class:`support.notify.NotifySocket` plays systemd's side)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.notify import NotifySocket

REPO = Path(__file__).resolve().parent.parent

# A stand-in service: ready after start-up, then a busy main loop calling watchdog() five times
# per iteration (the daemon calls it once), STOPPING=1 on SIGTERM; it prints its watchdog
# interval at start and how often it called watchdog() at the end.
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
    notifier.ready("child up")
    calls = 0
    while not stop:
        for _ in range(5):
            notifier.watchdog()
        calls += 5
        time.sleep(0.01)                  # one loop iteration
    notifier.stopping()
    print(calls, flush=True)
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
        pings = manager.wait_count("WATCHDOG", 5, timeout=30)
    finally:
        code, out, err = _stop(child)
    assert code == 0, err
    interval, calls = out.split()
    assert interval == "0.2"                              # the child saw the interval
    assert all(p.get("WATCHDOG") == "1" and p.pid == child.pid for p in pings)
    # Rate-limited, not one datagram per call: the child calls watchdog() five times in a row
    # each iteration, and at most once per 0.05 s is sent (the rate itself: test_sdnotify).
    pings = [n for n in manager.messages if "WATCHDOG" in n]
    assert len(pings) <= int(calls) // 5, (len(pings), calls)
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
    assert out.split()[0] == "None"
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
