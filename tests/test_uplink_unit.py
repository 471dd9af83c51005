"""agent.uplink.mqtt.Uplink in this process, against a real mosquitto with mTLS.

In-process (not the daemon as a subprocess) so that its counters are visible and its clock can
be moved: the in-flight bound, the reconnect back-off, a refused PUBACK retried after 30 s and
not in a hot loop, the metrics topic, and credentials that change on disk.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import ssl
import threading
from pathlib import Path

import pytest

import agent.uplink.mqtt as uplink_module
from agent.config import MqttConfig
from agent.dev.pki import issue_client_cert
from agent.uplink.mqtt import Uplink
from agent.uplink.outbox import Outbox
from support.agent_run import failures
from support.subscriber import Subscriber
from support.waiting import ManualClock, stays, wait_for

pytestmark = pytest.mark.mqtt


def mqtt_config(pki: Path, port: int, *, vid: str = "VIN1", cert: Path | None = None,
                key: Path | None = None, **overrides) -> MqttConfig:
    settings = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **overrides}
    return MqttConfig(host="127.0.0.1", port=port, ca=pki / "ca.crt",
                      cert=cert or pki / f"{vid}.crt", key=key or pki / f"{vid}.key", **settings)


def queue(outbox: Outbox, vid: str, count: int) -> list[int]:
    """``count`` events whose payload names their seq (``m<seq>``); their seqs."""
    return [outbox.add(f"vehicles/{vid}/events", "event", lambda seq: f"m{seq}".encode()).seq
            for _ in range(count)]


@pytest.fixture
def running(tmp_path):
    """Factory: an started Uplink on a fresh outbox; stopped (and the outbox closed) after."""
    made: list[tuple[Uplink, Outbox]] = []

    def make(config: MqttConfig, vid: str = "VIN1") -> tuple[Uplink, Outbox]:
        outbox = Outbox(tmp_path / f"outbox-{len(made)}.db")
        uplink = Uplink(config, vid, outbox)
        made.append((uplink, outbox))
        uplink.start()
        return uplink, outbox

    yield make
    for uplink, outbox in made:
        uplink.stop(offline_timeout=1.0)
        outbox.close()


@pytest.fixture
def clock(monkeypatch) -> ManualClock:
    """The uplink module's monotonic clock: it stands still until the test moves it."""
    manual = ManualClock()
    monkeypatch.setattr(uplink_module, "time", manual)
    return manual


# -- the in-flight bound -----------------------------------------------------------------------


def test_no_more_than_max_inflight_unacknowledged_then_everything_in_order(
        pki, broker, running):
    uplink, outbox = running(mqtt_config(pki, broker.port, max_inflight=3))
    assert uplink.connected.wait(10), uplink.last_error
    with Subscriber(pki, broker.port, "vehicles/VIN1/events") as cloud:
        os.kill(broker.pid, signal.SIGSTOP)        # the broker holds every PUBACK back
        try:
            seqs = queue(outbox, "VIN1", 10)
            uplink.wake()
            assert wait_for(lambda: uplink.counters.published >= 3, 10)
            # Nothing beyond the bound goes out while the three stay unacknowledged.
            assert stays(lambda: uplink.counters.published == 3, 1.0), uplink.counters
            assert len(outbox) == 10
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert wait_for(lambda: len(outbox) == 0, 15), uplink.status_line()
        got = cloud.wait_count("vehicles/VIN1/events", 10)
    assert uplink.counters.published == 10 and uplink.counters.acknowledged == 10
    assert [m.payload for m in got] == [f"m{seq}".encode() for seq in seqs]
    assert all(m.qos == 1 and not m.retain for m in got)


# -- reconnect back-off ------------------------------------------------------------------------


def test_backoff_doubles_from_min_to_max_with_jitter_and_restarts_after_a_connection(
        pki, broker, running, monkeypatch):
    """Each wait is drawn from [d/2, d]; d doubles up to reconnect_max_s; a successful
    connection brings it back to reconnect_min_s."""
    draws: list[tuple[float, float]] = []
    real_uniform = random.uniform

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return real_uniform(low, high)

    broker.kill()                                   # nothing listens on its port now
    monkeypatch.setattr(uplink_module.random, "uniform", uniform)
    uplink, _ = running(mqtt_config(pki, broker.port, reconnect_min_s=0.05,
                                    reconnect_max_s=0.4))
    assert wait_for(lambda: len(draws) >= 6, 20), draws
    assert draws[:6] == [(0.025, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.2, 0.4),
                         (0.2, 0.4)]
    assert uplink.counters.connect_failures >= 6
    assert "connection refused" in (uplink.last_error or "").lower(), uplink.last_error

    broker.restart()                                # same port
    assert uplink.connected.wait(10), uplink.last_error
    seen = len(draws)
    broker.kill()
    assert wait_for(lambda: len(draws) >= seen + 2, 20), draws
    assert draws[seen:seen + 2] == [(0.025, 0.05), (0.05, 0.1)]


# -- a refused publish -------------------------------------------------------------------------


def test_refused_publish_is_kept_and_retried_after_30_s_not_in_a_hot_loop(
        pki, broker, running, clock):
    # VIN1's certificate configured as VIN2: the ACL refuses every publish (PUBACK 0x87).
    uplink, outbox = running(mqtt_config(pki, broker.port, vid="VIN2", cert=pki / "VIN1.crt",
                                         key=pki / "VIN1.key"), vid="VIN2")
    assert uplink.connected.wait(10), uplink.last_error
    seqs = queue(outbox, "VIN2", 3)
    uplink.wake()
    assert wait_for(lambda: uplink.counters.refused == 3, 10), uplink.counters
    assert uplink.counters.refused_codes == {"Not authorized": 3}
    # Real time passes, the uplink's clock does not: no second attempt, not even at 29 s.
    assert stays(lambda: uplink.counters.published == 3, 1.5), uplink.counters
    clock.advance(29.0)
    assert stays(lambda: uplink.counters.published == 3, 0.5), uplink.counters
    assert [e.seq for e in outbox.pending(10)] == seqs          # kept, none taken as sent
    stats = outbox.stats()
    assert (stats.delivered, stats.failed) == (0, 3)
    refused_once = {seq: (1, "PUBACK 0x87 Not authorized") for seq in seqs}
    assert failures(outbox.path) == refused_once                # the reason is kept

    clock.advance(1.5)                                          # 30.5 s after the refusal
    assert wait_for(lambda: uplink.counters.refused == 6, 10), uplink.counters
    assert stays(lambda: uplink.counters.published == 6, 0.5), uplink.counters
    assert len(outbox) == 3 and outbox.stats().delivered == 0
    assert {seq: n for seq, (n, _) in failures(outbox.path).items()} == {seq: 2 for seq in seqs}


# -- status ------------------------------------------------------------------------------------


def test_status_is_online_while_connected_and_offline_after_stop_both_retained(
        pki, broker, running):
    uplink, _ = running(mqtt_config(pki, broker.port))
    assert uplink.connected.wait(10), uplink.last_error
    status = "vehicles/VIN1/status"
    with Subscriber(pki, broker.port, status) as late:       # subscribes after the fact
        got = late.wait_count(status, 1)
        assert [(m.payload, m.retain) for m in got] == [(b"online", True)]
        uplink.stop()
        got = late.wait_count(status, 2)
        assert (got[1].payload, got[1].qos) == (b"offline", 1)
    with Subscriber(pki, broker.port, status) as later:
        assert [(m.payload, m.retain) for m in later.wait_count(status, 1)] == \
            [(b"offline", True)]


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_go_to_the_metrics_topic_at_qos_0_not_retained_newest_only(
        pki, broker, running):
    uplink, outbox = running(mqtt_config(pki, broker.port))
    with Subscriber(pki, broker.port, "vehicles/VIN1/#") as cloud:
        assert uplink.connected.wait(10), uplink.last_error
        uplink.publish_metrics(b'{"n":1}')
        got = cloud.wait_count("vehicles/VIN1/metrics", 1)
        assert [(m.payload, m.qos, m.retain) for m in got] == [(b'{"n":1}', 0, False)]
    assert len(outbox) == 0                              # not queued in the outbox
    assert uplink.counters.published == 0                # nor counted as a signed message


# -- credentials changing on disk --------------------------------------------------------------


def test_unusable_new_credentials_keep_the_current_connection(tmp_path, pki, broker, running,
                                                               clock, caplog):
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("VIN1.crt", "VIN1.key"):
        shutil.copy2(pki / name, creds / name)
    uplink, outbox = running(mqtt_config(pki, broker.port, cert=creds / "VIN1.crt",
                                         key=creds / "VIN1.key"))
    assert uplink.connected.wait(10), uplink.last_error
    caplog.set_level(logging.WARNING, logger="car_agent.uplink")
    # Half a rotation: a new certificate whose key is not (yet) the matching one.
    other = tmp_path / "other"
    other.mkdir()
    new_cert, _ = issue_client_cert(other, "VIN1", ca_dir=pki)
    shutil.copy2(new_cert, creds / "VIN1.crt")
    clock.advance(uplink_module.CREDENTIALS_CHECK_S + 1)
    assert wait_for(lambda: "not usable" in caplog.text, 10), caplog.text
    assert "keeping the current ones" in caplog.text
    assert uplink.rotations == 0 and uplink.counters.connects == 1
    # Still connected and still delivering on the old connection.
    with Subscriber(pki, broker.port, "vehicles/VIN1/events") as cloud:
        queue(outbox, "VIN1", 2)
        uplink.wake()
        assert len(cloud.wait_count("vehicles/VIN1/events", 2)) == 2
    assert uplink.connected.is_set() and uplink.counters.connects == 1


def test_tls_1_3_minimum_connects_and_delivers(pki, broker, running):
    """``mqtt.tls_version: "1.3"``: the broker (minimum 1.2) negotiates 1.3 and delivery works."""
    uplink, outbox = running(mqtt_config(pki, broker.port, tls_version="1.3"))
    assert uplink.connected.wait(10), uplink.last_error
    sock = uplink.client.socket()
    assert sock is not None and sock.version() == "TLSv1.3"
    queue(outbox, "VIN1", 1)
    uplink.wake()
    assert wait_for(lambda: len(outbox) == 0, 10), uplink.status_line()


class Tls12OnlyServer:
    """A TLS server capped at TLS 1.2 with the broker's certificate; records handshake errors."""

    def __init__(self, pki: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(pki / "broker.crt", pki / "broker.key")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self.handshakes = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    self.handshakes += 1
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))

    def close(self) -> None:
        self.sock.close()


def test_tls_1_3_minimum_refuses_a_broker_capped_at_tls_1_2(pki, running):
    server = Tls12OnlyServer(pki)
    try:
        uplink, _ = running(mqtt_config(pki, server.port, tls_version="1.3"))
        assert wait_for(lambda: uplink.counters.connect_failures >= 2, 10), uplink.counters
        assert server.handshakes == 0
        assert server.errors and all("UNSUPPORTED_PROTOCOL" in error for error in server.errors), \
            server.errors
        assert not uplink.connected.is_set()
    finally:
        server.close()
