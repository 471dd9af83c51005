"""Faults the uplink and the daemon meet in a car: storage errors during delivery, a network
thread that fails, a stop while the broker is out of reach. A real mosquitto with mTLS; the
faults are injected into the outbox the uplink drains."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.config import MqttConfig
from agent.dev.broker import DevBroker, free_port
from agent.errors import KeyFileError, TransientError
from agent.uplink.signing import Signer, b64url_decode
from agent.dev.pki import init_pki
from agent.service.daemon import Agent
from agent.signals.model import Change
from agent.signals.policy import Outgoing
from agent.signals.state import VehicleState
from agent.signals.vehicle import load_vehicle
from agent.uplink.envelope import Envelopes, snapshot_size_bound
from agent.uplink.mqtt import Uplink, publish_packet_size
from agent.uplink import outbox as outbox_module
from agent.uplink.outbox import Outbox, OutboxInUse
from conftest import running_broker
from coredata import IS_OPEN, REPO
from support.agent_run import run_agent, simulated_drive, write_agent_config

DISK_FULL = "database or disk is full"


def wait_until(predicate, timeout: float = 20.0) -> bool:
    """Poll an observable condition (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def mqtt_config(pki: Path, port: int) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, ca=pki / "ca.crt", cert=pki / "VIN1.crt",
                      key=pki / "VIN1.key", reconnect_min_s=0.1, reconnect_max_s=0.5)


class FailingOutbox(Outbox):
    """An outbox whose ``method`` raises ``error`` on its first ``times`` calls."""

    def __init__(self, path: Path, method: str, error: BaseException, times: int) -> None:
        super().__init__(path)
        self.calls = 0
        original = getattr(self, method)

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls <= times:
                raise error
            return original(*args, **kwargs)

        setattr(self, method, failing)


def fill(outbox: Outbox, n: int) -> None:
    for _ in range(n):
        outbox.add("vehicles/VIN1/events", "event", lambda seq: b'{"seq":%d}' % seq)


@pytest.fixture
def uplinks():
    started: list[Uplink] = []
    yield started
    for uplink in started:
        uplink.stop(offline_timeout=0.5)


@pytest.mark.mqtt
def test_disk_full_on_puback_keeps_the_entry_and_retries(tmp_path, pki, broker, uplinks,
                                                         caplog):
    outbox = FailingOutbox(tmp_path / "o.db", "delete",
                           sqlite3.OperationalError(DISK_FULL), times=3)
    fill(outbox, 8)
    uplink = Uplink(mqtt_config(pki, broker.port), "VIN1", outbox)
    uplinks.append(uplink)
    with caplog.at_level(logging.ERROR, logger="car_agent.uplink"):
        uplink.start()
        assert wait_until(lambda: len(outbox) == 0), uplink.status_line()
    # The three failed deletes were retried, not republished: 8 published, 8 delivered.
    assert outbox.calls == 8 + 3
    assert uplink.counters.store_errors == 3
    assert (uplink.counters.published, uplink.counters.acknowledged) == (8, 8)
    assert outbox.stats().delivered == 8
    assert uplink.alive() and uplink.is_connected()
    assert uplink.counters.restarts == 0
    assert any(DISK_FULL in r.getMessage() and "kept and retried" in r.getMessage()
               for r in caplog.records)
    fill(outbox, 2)                          # still delivering afterwards
    uplink.wake()
    assert wait_until(lambda: len(outbox) == 0)
    outbox.close()


@pytest.mark.mqtt
def test_an_unexpected_error_in_the_network_thread_restarts_it(tmp_path, pki, broker, uplinks,
                                                               caplog):
    outbox = FailingOutbox(tmp_path / "o.db", "pending", RuntimeError("a bug"), times=1)
    fill(outbox, 5)
    uplink = Uplink(mqtt_config(pki, broker.port), "VIN1", outbox)
    uplinks.append(uplink)
    with caplog.at_level(logging.ERROR, logger="car_agent.uplink"):
        uplink.start()
        assert wait_until(lambda: len(outbox) == 0), uplink.status_line()
    assert uplink.counters.restarts == 1 and uplink.alive()
    assert outbox.stats().delivered == 5
    assert any("network thread failed (RuntimeError: a bug)" in r.getMessage()
               for r in caplog.records)
    outbox.close()


class Fatal(BaseException):
    """Stands for what no supervisor catches."""


def raise_fatal(*args, **kwargs):
    raise Fatal("end of the thread")


@pytest.mark.mqtt
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_network_thread_never_claims_connected(tmp_path, pki, broker, uplinks):
    outbox = Outbox(tmp_path / "o.db")
    uplink = Uplink(mqtt_config(pki, broker.port), "VIN1", outbox)
    uplinks.append(uplink)
    uplink.start()
    assert wait_until(uplink.is_connected)
    # Something the supervisor does not catch (as a BaseException would) ends the thread.
    fill(outbox, 1)
    outbox.pending = raise_fatal
    uplink.wake()
    assert wait_until(lambda: not uplink.alive())
    assert not uplink.is_connected()
    assert uplink.status_line().startswith("down (network thread ended)")
    outbox.close()


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> Path:
    return simulated_drive(tmp_path_factory.mktemp("drive"), 20.0, seed=4)


class AgentThread:
    """``Agent.run()`` in a thread (the capture replayed in real time), its result kept."""

    def __init__(self, config: Path) -> None:
        self.agent = Agent(config)
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = self.agent.run()

    def __enter__(self) -> "AgentThread":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.agent.request_stop()
        self.thread.join(30)


@pytest.mark.mqtt
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_daemon_stops_with_exit_1_when_the_network_thread_is_gone(tmp_path, pki, broker,
                                                                      drive):
    config = write_agent_config(tmp_path, pki, broker.port, capture=drive, realtime=True)
    with AgentThread(config) as running:
        assert wait_until(running.agent.uplink.is_connected)
        running.agent.outbox.pending = raise_fatal
        running.agent.uplink.wake()
        # Without the check the run ends only with the capture, exit 0, "connected".
        running.thread.join(60)
    assert running.result is not None
    assert running.result.exit_code == 1
    assert running.result.message.startswith("uplink network thread ended")


class AgentProcess:
    """``car-agent run`` as a child process; its stderr collected line by line."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                      str(config)], stderr=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.mark.mqtt
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_without_a_connection_does_not_wait_to_drain(tmp_path, pki, broker, drive,
                                                          tmp_path_factory, signum):
    foreign = tmp_path_factory.mktemp("foreign")
    init_pki(foreign, ["VIN1"])             # another CA: the broker refuses this certificate
    config = write_agent_config(tmp_path, pki, broker.port, capture=drive, realtime=True,
                                credentials=foreign)
    agent = AgentProcess(config)
    try:
        assert wait_until(lambda: agent.saw("uplink: cannot connect"), 30), agent.lines
        agent.proc.send_signal(signum)
        # Generous, and far below the 11 s this took when the stop waited for a drain.
        agent.proc.wait(timeout=8)
        agent.reader.join(5)
    finally:
        agent.kill()
    assert agent.proc.returncode == 0, agent.lines
    assert agent.saw("stopping: uplink not connected, not waiting for the outbox to drain")
    assert agent.saw("message(s) queued in"), agent.lines[-3:]
    with Outbox(tmp_path / "outbox.db") as outbox:   # what was signed stays queued
        assert len(outbox) > 0 and outbox.stats().delivered == 0


# --------------------------------------------------------------------------- boot numbers


def test_failed_starts_spend_no_boot_number(tmp_path, pki, drive):
    closed_port = free_port()              # nothing listens: delivery is not the point here
    bus_missing = write_agent_config(tmp_path, pki, closed_port, capture=drive)
    text = bus_missing.read_text().replace(
        f"can: {{capture: {drive}, realtime: false}}",
        "can: {interface: socketcan, channel: nosuchcan0}")
    bus_missing.write_text(text)
    for _ in range(3):                       # systemd retries every 5 s until the bus is up
        with pytest.raises(TransientError):
            Agent(bus_missing).run()
    mismatched = tmp_path / "mismatch.yaml"  # the TLS key does not belong to the certificate
    good_text = write_agent_config(tmp_path, pki, closed_port, capture=drive).read_text()
    mismatched.write_text(good_text.replace(f"cert: {pki / 'VIN1.crt'}",
                                            f"cert: {pki / 'VIN2.crt'}"))
    with pytest.raises(KeyFileError):
        Agent(mismatched)
    with Outbox(tmp_path / "outbox.db", count_boot=False) as outbox:
        assert outbox.boot == 0 and len(outbox) == 0
    good = write_agent_config(tmp_path, pki, closed_port, capture=drive)
    result = Agent(good, drain_timeout=0.1).run()   # opened the bus: boot 1
    assert result.exit_code == 1 and result.queued > 0
    with Outbox(tmp_path / "outbox.db", count_boot=False) as outbox:
        assert outbox.boot == 1
        tokens = [entry.payload.decode() for entry in outbox.pending(1000)]
    boots = {json.loads(b64url_decode(token.split(".")[1]))["boot"] for token in tokens}
    assert boots == {1}


# --------------------------------------------------------------------------- outbox age


class Clocks:
    """A wall clock that can be stepped, and a monotonic clock that only moves forward."""

    def __init__(self, wall: float = 1_780_000_000.0) -> None:
        self.wall = wall
        self.mono = 500.0

    def pass_time(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def outbox(self, path: Path, max_age_s: float = 100.0) -> Outbox:
        return Outbox(path, max_age_s=max_age_s, clock=lambda: self.wall,
                      monotonic=lambda: self.mono)


def add_event(outbox: Outbox) -> int:
    return outbox.add("vehicles/VIN1/events", "event", lambda seq: b"%d" % seq).seq


def test_max_age_applies_while_running_and_ignores_wall_clock_steps(tmp_path):
    clocks = Clocks()
    with clocks.outbox(tmp_path / "o.db") as outbox:
        add_event(outbox)                          # seq 1 at t=0
        clocks.pass_time(60)
        add_event(outbox)                          # seq 2 at t=60
        clocks.wall -= 26 * 365 * 86400            # NTP steps the clock back to 2000...
        clocks.pass_time(30)
        add_event(outbox)                          # seq 3 at t=90: nothing expired
        assert [e.seq for e in outbox.pending(10)] == [1, 2, 3]
        clocks.wall += 52 * 365 * 86400            # ...and far ahead: still nothing
        assert outbox.expire() == 0
        clocks.pass_time(11)                        # t=101: seq 1 is older than 100 s
        add_event(outbox)                          # the add applies the bound, no reopen
        assert [e.seq for e in outbox.pending(10)] == [2, 3, 4]
        assert outbox.stats().dropped_age == 1
        clocks.pass_time(60)                        # t=161: seq 2 (t=60) is too old
        assert outbox.expire() == 1 and len(outbox) == 2
        assert outbox.stats().oldest_age_s == pytest.approx(71.0)


@pytest.mark.parametrize("closed_for, step, kept", [
    (50, 0, [1, 2]),                       # closed 50 s: the age goes on, nothing too old
    (150, 0, []),                          # closed 150 s: both older than 100 s at open
    (50, 26 * 365 * 86400, [1, 2]),        # RTC read 2000, NTP fixed it: a step, not age
    (50, -3600, [1, 2]),                   # the clock went back while closed
])
def test_age_across_a_restart_counts_closed_time_but_not_clock_steps(tmp_path, closed_for,
                                                                     step, kept):
    clocks = Clocks(wall=946_684_800.0 if step > 0 else 1_780_000_000.0)
    with clocks.outbox(tmp_path / "o.db") as outbox:
        add_event(outbox)
        clocks.pass_time(20)
        add_event(outbox)
    clocks.wall += closed_for + step
    clocks.mono = 7.0                      # a new boot: the monotonic clock starts over
    with clocks.outbox(tmp_path / "o.db") as outbox:
        assert [e.seq for e in outbox.pending(10)] == kept
        assert outbox.stats().dropped_age == 2 - len(kept)


# --------------------------------------------------------------------------- one outbox, one agent


def test_outbox_lock_refuses_a_second_holder_until_closed(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path, lock=True):
        with pytest.raises(OutboxInUse) as refused:
            Outbox(path, lock=True)
        assert str(refused.value) == (f"{path}: outbox in use by process {os.getpid()} (another "
                                      "car-agent on the same store.path?); refusing to start a "
                                      "second one")
        assert refused.value.exit_code == 75
    with Outbox(path, lock=True) as outbox:          # released on close
        assert outbox.boot == 2


@pytest.mark.mqtt
def test_a_second_agent_on_the_same_outbox_is_refused_with_one_line(tmp_path, pki, broker,
                                                                    drive):
    config = write_agent_config(tmp_path, pki, broker.port, capture=drive, realtime=True)
    first = AgentProcess(config)
    try:
        assert wait_until(lambda: first.saw("uplink: connected"), 30), first.lines
        second = run_agent(config, timeout=60)
        assert second.returncode == 75, second.stderr
        assert second.stderr.splitlines() == [
            f"car-agent run: error: {tmp_path / 'outbox.db'}: outbox in use by process "
            f"{first.proc.pid} (another car-agent on the same store.path?); refusing to start "
            "a second one"]
        assert first.proc.poll() is None             # the first one is undisturbed
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=30)
    finally:
        first.kill()
    assert first.proc.returncode == 0


# --------------------------------------------------------------------------- maximum packet size

SMALL_PACKETS = 2048


@pytest.fixture
def small_broker(pki, tmp_path_factory, request):
    """A broker announcing a Maximum Packet Size of 2 KiB in its CONNACK."""
    dev = DevBroker(pki, tmp_path_factory.mktemp("small"),
                    extra_conf=f"max_packet_size {SMALL_PACKETS}")
    yield from running_broker(dev, request)


@pytest.mark.mqtt
def test_a_message_over_the_brokers_maximum_packet_size_is_dropped_not_resent(
        tmp_path, pki, small_broker, uplinks, caplog):
    outbox = Outbox(tmp_path / "o.db")
    topic = "vehicles/VIN1/state"
    sizes = [100, 3000, 200]
    for pad in sizes:
        outbox.add(topic, "state", lambda seq, pad=pad: b"%d" % seq + b"x" * pad)
    uplink = Uplink(mqtt_config(pki, small_broker.port), "VIN1", outbox)
    uplinks.append(uplink)
    with caplog.at_level(logging.ERROR, logger="car_agent.uplink"):
        uplink.start()
        assert wait_until(lambda: len(outbox) == 0), uplink.status_line()
    assert uplink.max_packet == SMALL_PACKETS                 # learnt from the CONNACK
    stats = outbox.stats()
    assert (stats.delivered, stats.dropped_oversize) == (2, 1)
    assert uplink.counters.oversize == 1 and uplink.counters.connects == 1   # no flapping
    [line] = [r.getMessage() for r in caplog.records if "maximum packet size" in r.getMessage()]
    assert line == ("uplink: seq 2 (state, 3028 bytes as an MQTT packet) exceeds the maximum "
                    "packet size of 2048 bytes; dropped, never sent (1 so far)")
    outbox.close()


def test_publish_packet_size_counts_the_mqtt_framing():
    # fixed header 1 + remaining length (1 byte below 128) + topic 2+1 + packet id 2 + props 1
    assert publish_packet_size("t", b"") == 1 + 1 + 3 + 2 + 1
    assert publish_packet_size("t", b"x" * 121) == 2 + 127
    # a snapshot response carries its Correlation Data as the one property
    assert publish_packet_size("t", b"", b"ab") == 1 + 1 + 3 + 2 + 1 + 5
    assert publish_packet_size("t", b"x" * 122) == 3 + 128


def snapshot_config(tmp_path: Path, limit: int) -> Path:
    path = tmp_path / "check.yaml"
    path.write_text(f"""\
vehicle_id: VIN1
dbc: [{REPO / 'dbc' / 'demo_vehicle.dbc'}]
mapping: {REPO / 'config' / 'mapping' / 'demo_vehicle.yaml'}
mqtt: {{host: broker.example, ca: ca.crt, cert: c.crt, key: c.key, max_packet_bytes: {limit}}}
""")
    return path


@pytest.mark.parametrize("limit, warned", [(4096, True), (128 * 1024, False)])
def test_check_config_warns_when_a_full_snapshot_can_exceed_the_limit(tmp_path, limit, warned):
    result = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config",
                             str(snapshot_config(tmp_path, limit))],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "mqtt.max_packet_bytes" in line]
    assert len(warnings) == int(warned), result.stderr
    if warned:
        assert warnings[0].startswith(f"warning: {tmp_path / 'check.yaml'}: a full snapshot of "
                                      "the 19 mapped signals can reach ")


def test_snapshot_size_bound_holds_for_a_real_signed_snapshot(pki):
    decoder = load_vehicle(REPO / "config" / "demo.yaml").decoder()
    state = VehicleState(decoder.paths)
    state.apply(0.0, [(i, -123456.78901234, "valid") for i in range(len(decoder.paths))])
    signer = Signer.from_file(pki / "VIN1.signing.key")
    envelopes = Envelopes(signer, "VIN1", 7, stream="f" * 20)
    token = envelopes.state(state, 1234.5)(2**40)
    bound = snapshot_size_bound(decoder.paths, "VIN1")
    assert len(token) <= bound < 2 * len(token)


# --------------------------------------------------------------------------- outbox locked


def test_an_outbox_locked_by_another_process_keeps_the_signed_event_pending(
        tmp_path, pki, drive, monkeypatch):
    monkeypatch.setattr(outbox_module, "BUSY_TIMEOUT_S", 0.2)   # the real one waits 5 s
    config = write_agent_config(tmp_path, pki, free_port(), capture=drive)
    agent = Agent(config)
    door = IS_OPEN[0]
    other = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")         # e.g. an sqlite3 shell holding the write lock
        agent._commit([Outgoing("event", (Change(1.0, door, True, "valid"),))], 1.0)
        assert len(agent.outbox) == 0 and agent.store_errors == 0
        other.execute("ROLLBACK")
        agent._locked_until = 0.0                # the retry is due (as a second later)
        agent._commit([Outgoing("event", (Change(2.0, door, False, "valid"),))], 2.0)
        entries = agent.outbox.pending(10)
        signals = [json.loads(b64url_decode(e.payload.decode().split(".")[1]))["signals"]
                   for e in entries]
        assert signals == [{door: True}, {door: False}]   # kept, and in order
        assert [e.seq for e in entries] == [1, 2] and agent.store_errors == 0
    finally:
        other.close()
        agent.outbox.close()


# --------------------------------------------------------------------------- signing key rotation


def test_a_rotated_signing_key_is_re_read_and_an_unusable_one_ignored(tmp_path, pki, drive,
                                                                     tmp_path_factory, caplog):
    key = tmp_path / "signing.key"
    shutil.copy(pki / "VIN1.signing.key", key)
    key.chmod(0o600)
    config = write_agent_config(tmp_path, pki, free_port(), capture=drive)
    config.write_text(config.read_text().replace(str(pki / "VIN1.signing.key"), str(key)))
    rotated = tmp_path_factory.mktemp("rotated")
    init_pki(rotated, ["VIN1"])                      # a new signing key for the same car
    old_kid = Signer.from_file(pki / "VIN1.signing.key").kid
    new_kid = Signer.from_file(rotated / "VIN1.signing.key").kid
    agent = Agent(config)
    door = IS_OPEN[0]

    def kid_of_next_event() -> str:
        agent._commit([Outgoing("event", (Change(1.0, door, True, "valid"),))], 1.0)
        token = agent.outbox.pending(1000)[-1].payload.decode()
        return json.loads(b64url_decode(token.split(".")[0]))["kid"]

    try:
        assert kid_of_next_event() == old_kid
        staged = tmp_path / "staged.key"
        staged.write_bytes(b"-----BEGIN PRIVATE KEY-----\nhalf writ")
        staged.chmod(0o600)
        os.replace(staged, key)                      # unusable: the current key stays
        with caplog.at_level(logging.WARNING, logger="car_agent.daemon"):
            agent._reload_signing_key()
        assert kid_of_next_event() == old_kid
        assert any("key file changed but is not usable" in r.getMessage()
                   for r in caplog.records)
        shutil.copy(rotated / "VIN1.signing.key", staged)
        staged.chmod(0o600)
        os.replace(staged, key)                      # the rotation proper
        agent._reload_signing_key()
        assert kid_of_next_event() == new_kid
    finally:
        agent.outbox.close()
