"""Snapshot on request (issue 9.1): the agent's one subscription, end to end.

Unit part: the request checks (``agent.uplink.requests``), the envelope kind, the cloud checker
on response topics, the outbox keeping correlation data, the ``cmd`` config keys, and a
Hypothesis fuzz of the inbound message (properties and payload).

Integration part: the real agent pipeline (``Agent``) in a thread, reading python-can's
``virtual`` bus that the test writes known frames to, signing, publishing through a real mosquitto
with mTLS and the dev broker's ACL; the cloud side asks with ``agent.cloud.snapshot``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.cloud.checks import MessageChecker
from agent.cloud.config import load_cloud_config, make_ssl_context
from agent.cloud.snapshot import (PendingSnapshots, correlation_of, make_request,
                                  publish_request)
from agent.config import load_config
from agent.errors import ConfigError
from agent.signals.state import VehicleState
from agent.uplink.envelope import Envelopes
from agent.uplink.outbox import Outbox
from agent.uplink.requests import (CORRELATION_TOO_LONG, FOREIGN_RESPONSE_TOPIC, MALFORMED,
                                   OVERSIZED, QUEUE_FULL, RATE_LIMITED, SnapshotRequest,
                                   SnapshotRequests)
from agent.uplink.signing import Signer, Verifier
from support.live_agent import RunningAgent, agent_yaml
from support.waiting import wait_for
from coredata import (BODY_ID, CLUSTER_ID, OPEN, RANGE, REL,
                      body_payload, cluster_payload)

NOT_AUTHORIZED = 0x87
TOPIC = "vehicles/VIN1/cmd/snapshot"


def props(response: str | None = None, correlation: bytes | None = None,
          user: list[tuple[str, str]] | None = None) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    if response is not None:
        p.ResponseTopic = response
    if correlation is not None:
        p.CorrelationData = correlation
    for pair in user or ():
        p.UserProperty = pair
    return p


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def requests(rate: float = 0.5, burst: int = 3, clock=None) -> SnapshotRequests:
    return SnapshotRequests("vehicles", "VIN1", rate, burst, clock or Clock())


# --------------------------------------------------------------------------- request checks


def test_a_good_request_is_queued_with_its_correlation_data():
    r = requests()
    assert not r.waiting
    assert r.offer(TOPIC, b"", props("vehicles/VIN1/snapshot/cloud-1", b"\x00\x01")) is None
    assert r.offer(TOPIC, b'{"why": "owner asked"}', props("vehicles/VIN1/snapshot")) is None
    assert r.waiting
    assert r.take() == [SnapshotRequest("vehicles/VIN1/snapshot/cloud-1", b"\x00\x01"),
                        SnapshotRequest("vehicles/VIN1/snapshot", None)]
    assert not r.waiting and r.take() == []
    assert r.counters.as_dict() == {"received": 2, "accepted": 2, "answered": 0,
                                    "ignored": dict.fromkeys(r.counters.ignored, 0)}


@pytest.mark.parametrize("topic, payload, properties, reason", [
    (TOPIC, b"", props(), MALFORMED),                                        # no response topic
    (TOPIC, b"", None, MALFORMED),
    (TOPIC, b"[1]", props("vehicles/VIN1/snapshot"), MALFORMED),             # not an object
    (TOPIC, b"\xff", props("vehicles/VIN1/snapshot"), MALFORMED),
    (TOPIC, b"[" * 600, props("vehicles/VIN1/snapshot"), MALFORMED),
    ("vehicles/VIN1/cmd/other", b"", props("vehicles/VIN1/snapshot"), MALFORMED),
    (None, b"", props("vehicles/VIN1/snapshot"), MALFORMED),                 # topic not UTF-8
    (TOPIC, b"x" * 1025, props("vehicles/VIN1/snapshot"), OVERSIZED),
    (TOPIC, b"{}" + b" " * 1000, props("vehicles/VIN1/snapshot/r", b"c" * 30), OVERSIZED),
    (TOPIC, b"", props("vehicles/VIN1/snapshot", user=[("k", "v" * 1100)]), OVERSIZED),
    (TOPIC, b"", props("vehicles/VIN2/snapshot/r"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/state"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/status"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/cmd/snapshot"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/snapshot/a/b"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/snapshot/a b"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/snapshot/+"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/snapshot/" + "r" * 65), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/snapshotX"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/snapshot/r\n"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("other/VIN1/snapshot"), FOREIGN_RESPONSE_TOPIC),
    (TOPIC, b"", props("vehicles/VIN1/snapshot", b"c" * 65), CORRELATION_TOO_LONG),
])
def test_bad_requests_are_ignored_and_counted_by_reason(topic, payload, properties, reason):
    r = requests()
    assert r.offer(topic, payload, properties) == reason
    assert not r.waiting
    assert r.counters.ignored[reason] == 1
    assert sum(r.counters.ignored.values()) == 1 and r.counters.accepted == 0


def test_limits_are_inclusive():
    r = requests(burst=5)
    response = "vehicles/VIN1/snapshot/r"             # 24 bytes
    assert r.offer(TOPIC, b"{}" + b" " * 997, props(response, b"c")) is None     # 1024 bytes
    assert r.offer(TOPIC, b"{}" + b" " * 998, props(response, b"c")) == OVERSIZED
    assert r.offer(TOPIC, b"", props("vehicles/VIN1/snapshot/" + "r" * 64, b"c" * 64)) is None


def test_rate_limit_burst_then_one_per_two_seconds():
    clock = Clock()
    r = requests(rate=0.5, burst=3, clock=clock)
    good = lambda: r.offer(TOPIC, b"", props("vehicles/VIN1/snapshot"))   # noqa: E731
    assert [good() for _ in range(4)] == [None, None, None, RATE_LIMITED]
    assert len(r.take()) == 3
    clock.t += 1.0
    assert good() == RATE_LIMITED
    clock.t += 1.0
    assert good() is None
    assert good() == RATE_LIMITED
    assert len(r.take()) == 1
    clock.t += 100.0                              # a quiet spell refills at most the burst
    assert [good() for _ in range(4)] == [None, None, None, RATE_LIMITED]
    assert r.counters.ignored[RATE_LIMITED] == 4 and r.counters.accepted == 7


def test_queue_is_bounded_when_the_loop_does_not_take():
    clock = Clock()
    r = requests(rate=10.0, burst=2, clock=clock)
    good = lambda: r.offer(TOPIC, b"", props("vehicles/VIN1/snapshot"))   # noqa: E731
    assert [good(), good()] == [None, None]
    clock.t += 10
    assert good() == QUEUE_FULL
    assert len(r.take()) == 2


_PROPERTY_VALUES = st.one_of(st.none(), st.text(max_size=80), st.binary(max_size=80),
                             st.integers(), st.lists(st.tuples(st.text(max_size=5),
                                                               st.text(max_size=5)), max_size=3))


class _FakeProperties:
    """Whatever a hostile or buggy client library might hand over as properties."""

    def __init__(self, response, correlation, user) -> None:
        if response is not None:
            self.ResponseTopic = response
        if correlation is not None:
            self.CorrelationData = correlation
        if user is not None:
            self.UserProperty = user


_RESPONSES = st.one_of(
    st.sampled_from(["vehicles/VIN1/snapshot", "vehicles/VIN1/snapshot/r-1_A",
                     "vehicles/VIN2/snapshot/r", "vehicles/VIN1/cmd/snapshot", "", "#",
                     "vehicles/VIN1/snapshot/", "vehicles/VIN1/snapshot/\x00"]),
    st.text(alphabet="vehiclsVIN12/snapshot+#-_ \x00é", max_size=40),
    st.builds(lambda s: "vehicles/VIN1/snapshot/" + s, st.text(max_size=70)))


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.sampled_from([TOPIC, None, "vehicles/VIN1/cmd/x", ""]) | st.text(max_size=30),
       payload=st.one_of(st.binary(max_size=1100), st.sampled_from([b"", b"{}", b" {} ", b"null"]),
                         st.builds(lambda n: b"{" * n, st.integers(0, 3000))),
       response=st.none() | _RESPONSES | _PROPERTY_VALUES,
       correlation=st.none() | st.binary(max_size=100) | _PROPERTY_VALUES,
       user=st.none() | _PROPERTY_VALUES,
       real=st.booleans())
def test_fuzz_inbound_message_never_raises_and_queues_only_good_requests(
        topic, payload, response, correlation, user, real):
    r = requests(burst=100)
    if real:
        try:
            properties = props(response, correlation,
                               user if isinstance(user, list) else None)
        except Exception:  # noqa: BLE001 - paho refuses to build it: nothing can arrive like it
            return
    else:
        properties = _FakeProperties(response, correlation, user)
    reason = r.offer(topic, payload, properties)
    queued = r.take()
    # An independent oracle for acceptance, written from the contract.
    ok_topic = isinstance(response, str) and (
        response == "vehicles/VIN1/snapshot" or (
            response.startswith("vehicles/VIN1/snapshot/")
            and 1 <= len(response) - 23 <= 64
            and all(c.isascii() and (c.isalnum() or c in "_-") for c in response[23:])))
    try:
        obj_ok = not payload.strip() or isinstance(json.loads(payload), dict)
    except (ValueError, RecursionError):
        obj_ok = False
    good = (topic == TOPIC and ok_topic and obj_ok and isinstance(payload, bytes)
            and (correlation is None or (isinstance(correlation, bytes) and len(correlation) <= 64))
            and (user is None or not real or isinstance(user, list)))
    if reason is None:
        assert good and queued == [SnapshotRequest(response, correlation)]
        size = len(payload) + len(response.encode()) + len(correlation or b"")
        assert size <= 1024
    else:
        assert queued == [] and r.counters.ignored[reason] == 1
    assert r.counters.received == 1


# --------------------------------------------------------------------------- envelope, checker


@pytest.fixture(scope="module")
def signer(pki) -> Signer:
    return Signer.from_file(pki / "VIN1.signing.key")


def test_snapshot_envelope_has_the_state_claims_and_its_own_kind(pki, signer):
    envelopes = Envelopes(signer, "VIN1", boot=4, clock=lambda: 1_764_000_000.5)
    state = VehicleState((REL, RANGE))
    state.apply(1_764_000_000.0, [(0, 41.2, "valid")])
    snap = envelopes.snapshot(state, 1_764_000_000.5)(9).decode()
    st_ = envelopes.state(state, 1_764_000_000.5)(10).decode()
    verifier = Verifier.from_jwks_file(pki / "jwks.json")
    _, snap_claims = verifier.verify(snap)
    _, state_claims = verifier.verify(st_)
    assert snap_claims["kind"] == "snapshot" and state_claims["kind"] == "state"
    assert (snap_claims["seq"], snap_claims["boot"], snap_claims["ts"]) == (9, 4, 1_764_000_000_500)
    for claims in (snap_claims, state_claims):
        assert claims["signals"] == {REL: 41.2, RANGE: None}
        assert claims["quality"] == {RANGE: state.snapshot(1_764_000_000.5)[RANGE]["quality"]}
        assert claims["age"] == {REL: 0.5, RANGE: None}


def test_checker_accepts_snapshots_only_on_response_topics_with_kind_snapshot(pki, signer):
    checker = MessageChecker(Verifier.from_jwks_file(pki / "jwks.json"))
    claims = {"vid": "VIN1", "boot": 1, "ts": 1_764_000_000_000, "signals": {REL: 50.0},
              "age": {REL: 1.5}}

    def token(seq, **extra):
        return signer.sign(dict(claims, seq=seq, **extra)).encode()

    ok = checker.check("vehicles/VIN1/snapshot/abc-1", token(1, kind="snapshot"))
    assert (ok["verified"], ok["kind"], ok["seq"], ok["vid"], ok["age"]) == \
        (True, "snapshot", 1, "VIN1", {REL: 1.5})
    assert checker.check("vehicles/VIN1/snapshot", token(2, kind="snapshot"))["verified"]
    assert "does not match topic 'snapshot'" in \
        checker.check("vehicles/VIN1/snapshot/abc", token(3, kind="state"))["rejected"]
    assert "kind claim 'None'" in checker.check("vehicles/VIN1/snapshot/abc", token(4))["rejected"]
    assert "does not match topic 'state'" in \
        checker.check("vehicles/VIN1/state", token(5, kind="snapshot"))["rejected"]
    assert "requester id" in \
        checker.check("vehicles/VIN1/snapshot/a b", token(6, kind="snapshot"))["rejected"]
    assert "does not match the topic's vehicle" in \
        checker.check("vehicles/VIN2/snapshot/abc", token(7, kind="snapshot"))["rejected"]
    assert "(cmd)" in checker.check("vehicles/VIN1/cmd/snapshot", b"")["rejected"]
    assert "unknown leaf 'state'/" in checker.check("vehicles/VIN1/state/x", b"")["rejected"]


# --------------------------------------------------------------------------- outbox, config


def test_outbox_keeps_correlation_data_and_upgrades_an_old_file(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)     # an outbox written before snapshot requests existed
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO meta VALUES ('schema', 1), ('next_seq', 8), ('boot', 3);"
        "CREATE TABLE entries (seq INTEGER PRIMARY KEY, created REAL NOT NULL, size INTEGER NOT"
        " NULL, kind TEXT NOT NULL, retain INTEGER NOT NULL, failures INTEGER NOT NULL DEFAULT 0,"
        " last_error TEXT, topic TEXT NOT NULL, payload BLOB NOT NULL);"
        "INSERT INTO entries (seq, created, size, kind, retain, topic, payload)"
        " VALUES (7, 1e10, 10, 'state', 1, 'vehicles/VIN1/state', x'41');")
    conn.commit()
    conn.close()
    with Outbox(path) as outbox:
        outbox.add("vehicles/VIN1/snapshot/r1", "snapshot", lambda seq: b"S%d" % seq,
                   correlation=b"\x00corr")
        entries = outbox.pending(10)
    assert [(e.seq, e.kind, e.payload, e.correlation) for e in entries] == \
        [(7, "state", b"A", None), (8, "snapshot", b"S8", b"\x00corr")]
    with Outbox(path) as outbox:      # and again, on the upgraded file
        assert outbox.pending(10)[1].correlation == b"\x00corr"


def test_cmd_config_defaults_and_keys(tmp_path):
    config = load_config(agent_yaml(tmp_path, ""))
    assert (config.cmd.enabled, config.cmd.snapshot_rate, config.cmd.snapshot_burst) == \
        (True, 0.5, 3)
    config = load_config(agent_yaml(tmp_path, "cmd: {enabled: false, snapshot_rate: 2, "
                                               "snapshot_burst: 10}\n"))
    assert (config.cmd.enabled, config.cmd.snapshot_rate, config.cmd.snapshot_burst) == \
        (False, 2.0, 10)


def test_check_config_says_whether_requests_are_answered(tmp_path, pki):
    import subprocess
    import sys

    from coredata import REPO

    mqtt_yaml = (f"mqtt: {{host: 127.0.0.1, ca: {pki / 'ca.crt'}, cert: {pki / 'VIN1.crt'}, "
                 f"key: {pki / 'VIN1.key'}}}\n")
    for extra, line in (("", "  snapshot requests: vehicles/VIN1/cmd/snapshot, 0.5/s, burst 3"),
                        ("cmd: {enabled: false}\n", "  snapshot requests: off (cmd.enabled: false)"),
                        ("cmd: {snapshot_rate: 2, snapshot_burst: 7}\n",
                         "  snapshot requests: vehicles/VIN1/cmd/snapshot, 2/s, burst 7")):
        result = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config",
                                 str(agent_yaml(tmp_path, mqtt_yaml + extra))],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert line in result.stdout.splitlines()


@pytest.mark.parametrize("text, words", [
    ("cmd: {snapshot_rate: 0}", "cmd.snapshot_rate"),
    ("cmd: {snapshot_burst: 0}", "cmd.snapshot_burst"),
    ("cmd: {enabled: 'no'}", "cmd.enabled"),
    ("cmd: {actuate: true}", "actuate"),
])
def test_cmd_config_errors_name_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_config(agent_yaml(tmp_path, text + "\n"))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_daemon_answers_through_the_outbox_and_survives_a_full_disk(tmp_path, pki, monkeypatch):
    """The loop's side, without a broker: a queued request becomes a signed snapshot entry with
    the response topic and correlation data; a store error is counted, not raised."""
    from agent.dev.broker import free_port
    from agent.service.daemon import Agent

    capture = tmp_path / "empty.log"
    capture.write_text("")
    config = agent_yaml(tmp_path, f"""\
can: {{capture: {capture}}}
signing: {{key: {pki / 'VIN1.signing.key'}}}
mqtt: {{host: 127.0.0.1, port: {free_port()}, ca: {pki / 'ca.crt'}, cert: {pki / 'VIN1.crt'},
        key: {pki / 'VIN1.key'}}}
store: {{path: {tmp_path / 'outbox.db'}}}
""")
    for key in ("VIN1.signing.key", "VIN1.key"):
        (pki / key).chmod(0o600)
    agent = Agent(config)
    try:
        requests = agent.uplink.requests
        assert requests.offer(TOPIC, b"", props("vehicles/VIN1/snapshot/r7", b"\x07")) is None
        agent._answer_requests(1_764_000_000.0)
        [entry] = agent.outbox.pending(10)
        assert (entry.topic, entry.kind, entry.retain, entry.correlation) == \
            ("vehicles/VIN1/snapshot/r7", "snapshot", False, b"\x07")
        _, claims = Verifier.from_jwks_file(pki / "jwks.json").verify(entry.payload.decode())
        assert (claims["kind"], claims["seq"], claims["vid"]) == ("snapshot", entry.seq, "VIN1")
        assert set(claims["signals"]) == set(agent.decoder.paths)
        assert requests.counters.answered == 1

        def disk_full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(agent.outbox, "add", disk_full)
        assert requests.offer(TOPIC, b"", props("vehicles/VIN1/snapshot/r8", b"\x08")) is None
        agent._answer_requests(1_764_000_001.0)
        assert (agent.store_errors, requests.counters.answered, requests.waiting) == (1, 1, False)
    finally:
        agent.outbox.close()


# --------------------------------------------------------------------------- through mosquitto


class Cloud:
    """The cloud identity: asks for snapshots, checks what comes back."""

    def __init__(self, cloud_yaml: Path, *filters: str) -> None:
        config = load_cloud_config(cloud_yaml)
        self.checker = MessageChecker(Verifier.from_jwks_file(config.trust))
        self.pending = PendingSnapshots()
        self.messages: list[tuple[str, bytes, bytes | None, dict]] = []
        self.acks: dict[int, object] = {}
        self.cond = threading.Condition()
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(make_ssl_context(config))
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in filters])
        client.connect(config.host, config.port)
        client.loop_start()
        self.client = client
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        record = self.checker.check(message.topic, message.payload, bool(message.retain))
        correlation = correlation_of(message)
        self.pending.deliver(message.topic, correlation, record)
        with self.cond:
            self.messages.append((message.topic, message.payload, correlation, record))
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        with self.cond:
            self.acks[mid] = reason
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes, properties: Properties | None):
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.acks, 10)
            return self.acks.pop(info.mid)

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def cloud(cloud_config):
    clients = []

    def make(*filters: str) -> Cloud:
        clients.append(Cloud(cloud_config(), *filters))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


@pytest.mark.mqtt
def test_request_is_answered_with_a_signed_snapshot_echoing_the_correlation_data(
        tmp_path, pki, broker, cloud):
    with RunningAgent(tmp_path, pki, broker.port) as car:
        car.keep_sending({CLUSTER_ID: cluster_payload(fuel=100, range_km=512, litres=300),  # 40 %
                          BODY_ID: body_payload(doors=(OPEN, 0, 0, 0), locks=(1, 1, 1, 1))})
        assert wait_for(lambda: car.agent.pipeline.state.snapshot(time.time())[RANGE]["value"]
                     == 512_000)
        asker = cloud("vehicles/VIN1/snapshot/+")
        request = make_request("vehicles", "VIN1", "status-1")
        asker.pending.expect(request)
        publish_request(asker.client, request)
        record = asker.pending.wait(request, 15)
        assert record is not None, asker.messages
        assert (record["verified"], record["kind"], record["topic"], record["vid"]) == \
            (True, "snapshot", "vehicles/VIN1/snapshot/status-1", "VIN1")
        assert record["signals"][REL] == 40.0 and record["signals"][RANGE] == 512_000
        assert record["signals"]["Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"] is True
        assert record["signals"]["Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"] is True
        assert isinstance(record["seq"], int) and record["seq"] >= 1
        assert record["boot"] == car.agent.outbox.boot
        assert 0 <= record["age"][RANGE] < 60
        [(topic, _, correlation, _)] = asker.messages
        assert correlation == request.correlation and len(correlation) == 16
        counters = car.agent.uplink.requests.counters
        assert (counters.received, counters.accepted, counters.answered) == (1, 1, 1)


@pytest.mark.mqtt
def test_foreign_response_topics_and_long_correlation_are_ignored_and_counted(
        tmp_path, pki, broker, cloud):
    with RunningAgent(tmp_path, pki, broker.port, "cmd: {snapshot_burst: 10}") as car:
        asker = cloud("vehicles/+/snapshot/+", "vehicles/+/snapshot", "vehicles/+/state")
        for response, correlation in (("vehicles/VIN2/snapshot/x", b"1"),
                                      ("vehicles/VIN1/state", b"2"),
                                      ("vehicles/VIN1/cmd/snapshot", b"3"),
                                      ("vehicles/VIN1/snapshot/x", b"4" * 65)):
            assert not asker.publish(TOPIC, b"", props(response, correlation)).is_failure
        assert not asker.publish(TOPIC, b"x" * 2000, props("vehicles/VIN1/snapshot/x", b"5")) \
            .is_failure
        assert not asker.publish(TOPIC, b"", props("vehicles/VIN1/snapshot/x", b"6")).is_failure
        # Requests are handled in order: once the good one is answered, the others were seen.
        assert asker.wait_for(lambda: any(m[2] == b"6" for m in asker.messages))
        assert [(m[0], m[2], m[3]["verified"]) for m in asker.messages] == \
            [("vehicles/VIN1/snapshot/x", b"6", True)]
        counters = car.agent.uplink.requests.counters
        assert counters.ignored[FOREIGN_RESPONSE_TOPIC] == 3
        assert counters.ignored[CORRELATION_TOO_LONG] == 1
        assert counters.ignored[OVERSIZED] == 1
        assert (counters.received, counters.answered) == (6, 1)


@pytest.mark.mqtt
def test_rate_limit_answers_the_burst_and_counts_the_rest_in_metrics(
        tmp_path, pki, broker, cloud):
    with RunningAgent(tmp_path, pki, broker.port,
                      "cmd: {snapshot_rate: 0.001, snapshot_burst: 2}"):
        asker = cloud("vehicles/VIN1/snapshot/+", "vehicles/VIN1/metrics")
        for i in range(5):
            assert not asker.publish(TOPIC, b"", props("vehicles/VIN1/snapshot/r", b"%d" % i)) \
                .is_failure

        def metrics():
            return [json.loads(m[1]) for m in asker.messages if m[0].endswith("/metrics")]

        assert asker.wait_for(lambda: any(
            m.get("snapshot_requests", {}).get("ignored", {}).get(RATE_LIMITED) == 3
            for m in metrics()))
        answers = [m for m in asker.messages if "/snapshot/" in m[0]]
        assert [m[2] for m in answers] == [b"0", b"1"]
        assert all(m[3]["verified"] and m[3]["kind"] == "snapshot" for m in answers)
        assert answers[1][3]["seq"] > answers[0][3]["seq"]
        last = [m for m in metrics() if m["snapshot_requests"]["ignored"][RATE_LIMITED] == 3][-1]
        assert last["snapshot_requests"]["received"] == 5
        assert last["snapshot_requests"]["answered"] == 2


@pytest.mark.mqtt
def test_acl_only_the_cloud_sends_requests_and_a_vehicle_reads_only_its_own(
        broker, mqtt_client, pki):
    vin1, vin2, cloud_client = mqtt_client("VIN1"), mqtt_client("VIN2"), mqtt_client("cloud")
    assert vin2.publish("vehicles/VIN1/cmd/snapshot", b"").value == NOT_AUTHORIZED
    assert vin1.publish("vehicles/VIN1/cmd/snapshot", b"").value == NOT_AUTHORIZED
    assert vin1.publish("vehicles/VIN2/snapshot/r", b"x").value == NOT_AUTHORIZED
    assert not vin1.publish("vehicles/VIN1/snapshot/r", b"x").is_failure
    assert not vin1.publish("vehicles/VIN1/state", b"x").is_failure
    # VIN2 listens to VIN1's (and everyone's) requests; VIN1 to its own.
    got: dict[str, list[str]] = {"VIN1": [], "VIN2": []}
    cond = threading.Condition()
    listeners = []
    for name, filters in (("VIN1", ["vehicles/VIN1/cmd/#"]),
                          ("VIN2", ["vehicles/VIN1/cmd/#", "vehicles/+/cmd/#", "#"])):
        ready = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"listen-{name}",
                             protocol=mqtt.MQTTv5)
        ctx = make_ssl_context(load_cloud_config(_cloud_yaml(pki, broker.port, name)))
        client.tls_set_context(ctx)

        def on_message(c, u, m, name=name):
            with cond:
                got[name].append(m.topic)
                cond.notify_all()
        client.on_message = on_message
        client.on_subscribe = lambda *a, ready=ready: ready.set()
        client.on_connect = lambda c, *a, filters=filters: c.subscribe([(f, 1) for f in filters])
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        listeners.append(client)
        assert ready.wait(10)
    try:
        for vid in ("VIN1", "VIN2"):
            assert not cloud_client.publish(f"vehicles/{vid}/cmd/snapshot", b"").is_failure
        with cond:
            assert cond.wait_for(lambda: got["VIN1"] == ["vehicles/VIN1/cmd/snapshot"]
                                 and got["VIN2"], 10)
        # Delivery to one client keeps order: had VIN1's request (published first) reached VIN2,
        # it would be there before VIN2's own.
        assert set(got["VIN2"]) == {"vehicles/VIN2/cmd/snapshot"}
    finally:
        for client in listeners:
            client.disconnect()
            client.loop_stop()


def _cloud_yaml(pki: Path, port: int, name: str) -> Path:
    path = pki.parent / f"listen-{name}.yaml"
    path.write_text(f"mqtt: {{host: 127.0.0.1, port: {port}, ca: {pki / 'ca.crt'}, "
                    f"cert: {pki / f'{name}.crt'}, key: {pki / f'{name}.key'}}}\n"
                    f"trust: {pki / 'jwks.json'}\n")
    return path


# What mosquitto lets through: UTF-8 without NUL, control characters or non-characters (it
# disconnects a client that sends them: the unit fuzz above covers those), no wildcards.
_MQTT_TEXT = st.characters(blacklist_characters="+#", blacklist_categories=("Cc", "Cs", "Cn"))
_LIVE_RESPONSES = st.one_of(
    st.sampled_from(["vehicles/VIN1/snapshot", "vehicles/VIN1/snapshot/r1", "vehicles/VIN2/snapshot",
                     "vehicles/VIN1/state", "vehicles/VIN1/cmd/snapshot", "x", "vehicles/VIN1/"]),
    st.builds(lambda s: "vehicles/VIN1/snapshot/" + s,
              st.text(alphabet=_MQTT_TEXT, max_size=70)))


@pytest.mark.mqtt
@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),   # no shrinking against a live broker
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(
    st.none() | _LIVE_RESPONSES,
    st.none() | st.binary(max_size=100),
    st.binary(max_size=1500) | st.sampled_from([b"", b"{}", b'{"a": [1, 2]}', b"null"]),
    st.lists(st.tuples(st.text(alphabet=_MQTT_TEXT, max_size=20),
                       st.text(alphabet=_MQTT_TEXT, max_size=300)), max_size=3)),
    min_size=1, max_size=12))
def test_fuzz_live_requests_never_disturb_the_agent(live, batch):
    """Hostile requests through mosquitto: the agent answers exactly the good ones, counts every
    request, and still answers the next good one."""
    car, asker = live
    expected = SnapshotRequests("vehicles", "VIN1", 1000.0, 1000)   # same checks, no rate limit
    counters = car.agent.uplink.requests.counters
    received, answered = counters.received, counters.answered
    before = len(asker.messages)
    good = 0
    for response, correlation, payload, user in batch:
        p = props(response, correlation, user)
        if expected.offer(TOPIC, payload, p) is None:
            good += 1
        assert not asker.publish(TOPIC, payload, p).is_failure
    marker = uuid.uuid4().bytes
    assert not asker.publish(TOPIC, b"", props("vehicles/VIN1/snapshot/end", marker)).is_failure
    assert asker.wait_for(lambda: any(m[2] == marker for m in asker.messages))
    answers = asker.messages[before:]
    assert len(answers) == good + 1
    assert all(m[3]["verified"] and m[3]["kind"] == "snapshot" for m in answers)
    assert counters.received - received == len(batch) + 1
    assert counters.answered - answered == good + 1
    assert car.thread.is_alive()


@pytest.fixture
def live(tmp_path, pki, broker, cloud):
    with RunningAgent(tmp_path, pki, broker.port,
                      "cmd: {snapshot_rate: 1000, snapshot_burst: 100}") as car:
        yield car, cloud("vehicles/+/snapshot/+", "vehicles/+/snapshot", "vehicles/+/state")
