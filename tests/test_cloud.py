"""Tests for agent.cloud: the verifying watcher, against a real mosquitto (no mocks)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cloud.checks import MAX_PAYLOAD_BYTES, MessageChecker, SeqTracker
from agent.cloud.config import load_cloud_config
from agent.cloud.watch import CloudWatcher, format_human, watch_main
from agent.uplink.tlsdiag import describe_tls_alert
from agent.errors import ConfigError, KeyFileError, UserError
from agent.dev.pki import init_pki, issue_client_cert
from agent.uplink.signing import Signer, Verifier, b64url_decode, b64url_encode
from agent.dev.broker import free_port
from support.waiting import wait_for

RANGE = "Vehicle.Powertrain.FuelSystem.Range"
DOOR = "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"
HOOD = "Vehicle.Body.Hood.IsOpen"


def make_claims(n: int, *, vid: str = "VIN1", kind: str = "event", **extra: Any) -> dict:
    """Claims with seq ``n``; keyword arguments replace or add claims (even ``seq``)."""
    claims = {
        "vid": vid,
        "seq": n,
        "boot": 3,
        "ts": 1_700_000_000_000 + n,
        "signals": {RANGE: 512000, DOOR: False, HOOD: None},
        "quality": {HOOD: "invalid"},
        "kind": kind,
    }
    claims.update(extra)
    return claims


@pytest.fixture(scope="module")
def signer(pki: Path) -> Signer:
    return Signer.from_file(pki / "VIN1.signing.key")


class Collector:
    """Records what a CloudWatcher hands over; waits for them with a timeout."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.problems: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, record: dict) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def problem(self, text: str) -> None:
        with self._cond:
            self.problems.append(text)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[dict]], bool], timeout: float = 5.0) -> list[dict]:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.records), timeout), self.records
            return list(self.records)

    def wait_count(self, n: int, timeout: float = 5.0) -> list[dict]:
        return self.wait(lambda records: len(records) >= n, timeout)


@pytest.fixture
def watch(cloud_config) -> Callable[..., tuple[CloudWatcher, Collector]]:
    """Factory: a started CloudWatcher (connected and subscribed) and its Collector."""
    started: list[CloudWatcher] = []

    def make(wait: bool = True, **config_args: Any) -> tuple[CloudWatcher, Collector]:
        collector = Collector()
        watcher = CloudWatcher(load_cloud_config(cloud_config(**config_args)), collector,
                               on_problem=collector.problem)
        started.append(watcher.start())
        if wait:
            assert watcher.connected.wait(5), collector.problems
        return watcher, collector

    yield make
    for watcher in started:
        watcher.stop()


# --------------------------------------------------------------------------- end to end


def test_verified_event_has_exact_claims(watch, mqtt_client, signer) -> None:
    _, seen = watch()
    claims = make_claims(7)
    assert not mqtt_client("VIN1").publish("vehicles/VIN1/events", signer.sign(claims)).is_failure
    [record] = seen.wait_count(1)
    assert record == {
        "vid": "VIN1",
        "topic": "vehicles/VIN1/events",
        "kind": "event",
        "seq": 7,
        "stream": "",          # no stream claim: an agent from before streams
        "boot": 3,
        "ts": 1_700_000_000_007,
        "signals": {RANGE: 512000, DOOR: False, HOOD: None},
        "quality": {HOOD: "invalid"},
        "kid": signer.kid,
        "alg": "ES256",
        "verified": True,
        "retained": False,
    }


def test_state_carries_age_and_late_subscriber_gets_retained(watch, mqtt_client, signer) -> None:
    claims = make_claims(11, kind="state", age={RANGE: 1.5, DOOR: None, HOOD: None})
    client = mqtt_client("VIN1")
    assert not client.publish("vehicles/VIN1/state", signer.sign(claims), retain=True).is_failure
    assert not client.publish("vehicles/VIN1/status", "online", retain=True).is_failure
    _, seen = watch()  # subscribes after the fact
    records = seen.wait_count(2)
    state = next(r for r in records if r.get("kind") == "state")
    assert state["verified"] and state["retained"]
    assert state["seq"] == 11 and state["age"] == {RANGE: 1.5, DOOR: None, HOOD: None}
    status = next(r for r in records if r.get("kind") == "status")
    assert status == {"vid": "VIN1", "topic": "vehicles/VIN1/status", "kind": "status",
                      "status": "online", "verified": False, "retained": True}


def test_rejections(watch, mqtt_client, signer, pki) -> None:
    """Every bad message becomes a rejection with its reason; none crashes the watcher."""
    watcher, seen = watch()
    vin1, vin2 = mqtt_client("VIN1"), mqtt_client("VIN2")

    header, payload, sig = signer.sign(make_claims(1)).split(".")
    forged = json.loads(b64url_decode(payload))
    forged["signals"][RANGE] = 999999
    tampered = ".".join([header, b64url_encode(json.dumps(forged).encode()), sig])
    stranger = Signer(ec.generate_private_key(ec.SECP256R1()))
    vin1_key_for_vin2 = signer.sign(make_claims(2, vid="VIN2"))

    cases = [
        (vin1, "vehicles/VIN1/events", tampered, "bad signature"),
        (vin1, "vehicles/VIN1/events", stranger.sign(make_claims(3)), "unknown kid"),
        (vin1, "vehicles/VIN1/events", b"\x00garbage", "malformed"),
        (vin1, "vehicles/VIN1/events", b"\xff\xfe", "malformed: payload is not UTF-8"),
        (vin1, "vehicles/VIN1/events", b"x" * (MAX_PAYLOAD_BYTES + 1), "payload too large"),
        (vin1, "vehicles/VIN1/events", b"", "empty payload"),
        (vin1, "vehicles/VIN1/x", b"hi", "unexpected topic"),
        # (The dev broker's ACL lets a vehicle publish below its leaf only snapshot answers.)
        (vin1, "vehicles/VIN1/snapshot/r1", signer.sign(make_claims(6, kind="state")),
         "does not match topic 'snapshot'"),
        # The topic says VIN1 but the signed claims say VIN2.
        (vin1, "vehicles/VIN1/events", vin1_key_for_vin2, "does not match the topic"),
        # VIN2's own topic, but signed with VIN1's key: a vehicle must not sign for another.
        (vin2, "vehicles/VIN2/events", vin1_key_for_vin2, "belongs to vehicle 'VIN1'"),
        (vin1, "vehicles/VIN1/state", signer.sign(make_claims(4, kind="event")),
         "does not match topic 'state'"),
        (vin1, "vehicles/VIN1/events", signer.sign(make_claims(5, seq="5")), "'seq'"),
    ]
    for client, topic, payload, _ in cases:
        assert not client.publish(topic, payload).is_failure
    records = seen.wait_count(len(cases))
    assert len(records) == len(cases)
    for record, (_, topic, _, reason) in zip(records, cases):
        assert record["verified"] is False
        assert record["topic"] == topic
        assert reason in record["rejected"], (reason, record)
    assert records[0]["rejected"] == "bad signature"
    assert records[1]["rejected"] == "unknown kid"
    assert records[8]["seq"] == 2
    # Still alive and verifying.
    assert not vin1.publish("vehicles/VIN1/events", signer.sign(make_claims(6))).is_failure
    assert seen.wait_count(len(cases) + 1)[-1]["verified"] is True
    assert watcher.connected.is_set()


def test_duplicate_and_out_of_order_seq(watch, mqtt_client, signer) -> None:
    _, seen = watch()
    vin1 = mqtt_client("VIN1")
    tokens = {seq: signer.sign(make_claims(seq)) for seq in (1, 2, 3, 5)}
    for seq in (1, 3, 2, 3, 5, 1):
        vin1.publish("vehicles/VIN1/events", tokens[seq])
    records = seen.wait_count(6)
    assert [(r.get("seq"), r["verified"]) for r in records] == [
        (1, True), (3, True), (2, True), (3, False), (5, True), (1, False)]
    assert records[3]["rejected"] == "duplicate seq 3"
    assert records[5]["rejected"] == "duplicate seq 1"


def test_watcher_reconnects_after_broker_restart(watch, mqtt_client, signer, broker) -> None:
    watcher, seen = watch()
    broker.kill()
    assert wait_for(lambda: not watcher.connected.is_set(), 5)
    broker.restart()
    assert watcher.connected.wait(5), seen.problems
    mqtt_client("VIN1").publish("vehicles/VIN1/events", signer.sign(make_claims(1)))
    assert seen.wait_count(1)[0]["verified"] is True
    assert any("lost" in p for p in seen.problems), seen.problems


# --------------------------------------------------------------------------- watch_main


class _Stream(io.StringIO):
    """A text stream that sets ``subscribed`` once the watcher says so."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribed = threading.Event()

    def write(self, text: str) -> int:
        if "subscribed to" in text:
            self.subscribed.set()
        return super().write(text)


def _publish_when_subscribed(err: _Stream, publish: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        if err.subscribed.wait(5):
            publish()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_watch_main_json_count(cloud_config, mqtt_client, signer) -> None:
    vin1 = mqtt_client("VIN1")
    out, err = io.StringIO(), _Stream()

    def publish() -> None:
        vin1.publish("vehicles/VIN1/status", "online")
        vin1.publish("vehicles/VIN1/events", signer.sign(make_claims(1)))
        vin1.publish("vehicles/VIN1/events", b"garbage")
        vin1.publish("vehicles/VIN1/events", signer.sign(make_claims(1)))  # duplicate
        vin1.publish("vehicles/VIN1/state", signer.sign(make_claims(2, kind="state", age={})))
        vin1.publish("vehicles/VIN1/events", signer.sign(make_claims(3)))
        vin1.publish("vehicles/VIN1/events", signer.sign(make_claims(4)))  # beyond count

    thread = _publish_when_subscribed(err, publish)
    # Ended by the count: seq 4 was published too (the duration is only a backstop).
    rc = watch_main(cloud_config(), json_lines=True, count=3, duration=60, out=out, err=err)
    thread.join(5)
    assert rc == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("seq") for line in lines if line["verified"]] == [1, 2, 3]
    assert lines[0] == {"vid": "VIN1", "topic": "vehicles/VIN1/status", "kind": "status",
                        "status": "online", "verified": False, "retained": False}
    rejected = [line for line in lines if "rejected" in line]
    assert [r["rejected"].split(":")[0] for r in rejected] == ["malformed", "duplicate seq 1"]
    assert rejected[1] == {"topic": "vehicles/VIN1/events", "rejected": "duplicate seq 1",
                           "verified": False, "seq": 1}
    state = next(line for line in lines if line.get("kind") == "state")
    assert set(state) == {"vid", "topic", "kind", "seq", "stream", "boot", "ts", "signals",
                          "quality", "age", "kid", "alg", "verified", "retained"}
    assert err.getvalue().startswith("car-agent watch: connected to 127.0.0.1:")


def test_watch_main_human(cloud_config, mqtt_client, signer) -> None:
    vin1 = mqtt_client("VIN1")
    out, err = io.StringIO(), _Stream()

    def publish() -> None:
        vin1.publish("vehicles/VIN1/events", b"garbage")
        vin1.publish("vehicles/VIN1/events", signer.sign(make_claims(9)))

    thread = _publish_when_subscribed(err, publish)
    assert watch_main(cloud_config(), False, 1, 10, out=out, err=err) == 0
    thread.join(5)
    [line] = out.getvalue().splitlines()
    assert line.startswith("VIN1 event seq=9 boot=3 2023-11-14T22:13:20.009Z")
    assert f"{RANGE}=512000" in line and f"{DOOR}=false" in line
    assert line.endswith(f"{HOOD}=invalid {DOOR}=false {RANGE}=512000")
    rejected = [x for x in err.getvalue().splitlines() if x.startswith("rejected")]
    assert rejected == ["rejected vehicles/VIN1/events: malformed: expected 3 dot-separated parts"]


def test_watch_main_duration_without_messages(cloud_config) -> None:
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    assert watch_main(cloud_config(), True, None, 0.5, out=out, err=err) == 0
    assert time.monotonic() - started >= 0.5          # it waited the whole duration
    assert out.getvalue() == ""


def test_watch_main_ends_on_sigterm(cloud_config) -> None:
    out, err = io.StringIO(), _Stream()
    returned, hung = threading.Event(), threading.Event()

    def terminate() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        if not returned.wait(60):        # not ended by SIGTERM: end it by SIGINT, and fail
            hung.set()
            os.kill(os.getpid(), signal.SIGINT)

    thread = _publish_when_subscribed(err, terminate)
    before = signal.getsignal(signal.SIGTERM)
    assert watch_main(cloud_config(), True, None, None, out=out, err=err) == 0   # no duration
    returned.set()
    thread.join(5)
    assert not hung.is_set(), "watch did not end on SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored


def test_watch_main_rejects_bad_limits(cloud_config) -> None:
    with pytest.raises(UserError, match="--count"):
        watch_main(cloud_config(), True, 0, None)
    with pytest.raises(UserError, match="--duration"):
        watch_main(cloud_config(), True, None, 0)


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory) -> Path:
    """Another CA with its own 'cloud' certificate: trusted by nobody here."""
    directory = tmp_path_factory.mktemp("foreign") / "pki"
    init_pki(directory, ["VIN1"])
    return directory


def _watch_fails(config: Path, expected: str, duration: float = 1.0) -> str:
    out, err = io.StringIO(), io.StringIO()
    rc = watch_main(config, True, None, duration, out=out, err=err)
    assert rc == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines  # one line, not one per retry
    assert expected in lines[0], lines[0]
    assert out.getvalue() == ""
    return lines[0]


def test_client_cert_from_another_ca(cloud_config, foreign_pki) -> None:
    line = _watch_fails(cloud_config(cert=foreign_pki / "cloud.crt", key=foreign_pki / "cloud.key"),
                        "broker refused the client certificate: TLSV1_ALERT_UNKNOWN_CA")
    assert line.startswith("car-agent watch: ")


def test_expired_client_cert(cloud_config, pki, tmp_path) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = issue_client_cert(tmp_path / "old", "cloud", ca_dir=pki,
                                  not_before=now - dt.timedelta(days=30),
                                  not_after=now - dt.timedelta(days=1))
    _watch_fails(cloud_config(cert=cert, key=key),
                 "broker refused the client certificate: SSLV3_ALERT_CERTIFICATE_EXPIRED")


def test_untrusted_broker(cloud_config, foreign_pki) -> None:
    _watch_fails(cloud_config(ca=foreign_pki / "ca.crt"), "is not trusted: self-signed certificate")


def test_connection_refused(cloud_config) -> None:
    _watch_fails(cloud_config(port=free_port()), "connection refused by 127.0.0.1:")


# --------------------------------------------------------------------------- config


def test_config_typo_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("mqtt:\n  host: localhost\n  prot: 8883\n  ca: a\n  cert: b\n  key: c\n"
                    "trust: jwks.json\n")
    with pytest.raises(ConfigError, match=r"cloud\.yaml: mqtt\.prot: unknown key"):
        load_cloud_config(path)
    path.write_text("mqtt: {host: h, ca: a, cert: b, key: c}\ntrusts: jwks.json\n")
    with pytest.raises(ConfigError, match=r"cloud\.yaml: trusts: unknown key"):
        load_cloud_config(path)
    path.write_text("mqtt: {host: h, ca: a, cert: b, key: c}\n")
    with pytest.raises(ConfigError, match=r"cloud\.yaml: trust: missing"):
        load_cloud_config(path)
    path.write_text("mqtt: {host: h, port: 0, ca: a, cert: b, key: c}\ntrust: j\n")
    with pytest.raises(ConfigError, match=r"mqtt\.port: expected an integer"):
        load_cloud_config(path)


def test_config_paths_relative_to_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "cloud.yaml"
    path.parent.mkdir()
    path.write_text("mqtt: {host: broker.example, ca: pki/ca.crt, cert: /abs/c.crt, key: k}\n"
                    "trust: ../jwks.json\n")
    config = load_cloud_config(path)
    assert config.ca == path.parent / "pki/ca.crt"
    assert config.cert == Path("/abs/c.crt")
    assert config.trust == path.parent / "../jwks.json"
    assert (config.port, config.topic_prefix) == (8883, "vehicles")


def test_missing_client_key_is_one_line(cloud_config, pki, tmp_path) -> None:
    with pytest.raises(KeyFileError, match=r"mqtt\.key: .*nope\.key: file not found"):
        watch_main(cloud_config(key=tmp_path / "nope.key"), True, 1, 1)
    with pytest.raises(ConfigError, match="jwks-missing.json: file not found"):
        watch_main(cloud_config(trust=tmp_path / "jwks-missing.json"), True, 1, 1)


# --------------------------------------------------------------------------- checker (no broker)


@pytest.fixture(scope="module")
def checker(pki: Path) -> MessageChecker:
    return MessageChecker(Verifier.from_jwks_file(pki / "jwks.json"))


@pytest.mark.parametrize("change, reason", [
    ({"vid": 1}, "'vid'"),
    ({"seq": 0}, "'seq'"),
    ({"seq": True}, "'seq'"),
    ({"seq": 2**63}, "'seq'"),
    ({"boot": 1.5}, "'boot'"),
    ({"ts": None}, "'ts'"),
    ({"signals": []}, "'signals'"),
    ({"quality": "stale"}, "'quality'"),
    ({"age": 3}, "'age'"),
    ({"kind": 7}, "'kind'"),
])
def test_claim_types(checker, signer, change, reason) -> None:
    record = checker.check("vehicles/VIN1/events", signer.sign(make_claims(1, **change)).encode())
    assert record["verified"] is False
    assert record["rejected"].startswith("bad claims: ") and reason in record["rejected"]
    assert "seq" not in record


def test_missing_claims_and_inferred_kind(checker, signer) -> None:
    claims = make_claims(1)
    del claims["ts"]
    assert "'ts'" in checker.check("vehicles/VIN1/events", signer.sign(claims).encode())["rejected"]
    claims = make_claims(2)
    del claims["kind"], claims["quality"]
    record = checker.check("vehicles/VIN1/state", signer.sign(claims).encode())
    assert record["verified"] and record["kind"] == "state" and record["quality"] == {}


def test_eddsa_and_key_without_vid(tmp_path: Path, signer) -> None:
    ed = Signer(ed25519.Ed25519PrivateKey.generate())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [ed.public_jwk]}))
    with pytest.raises(ConfigError, match="bound to no vehicle"):   # fail closed (issue 13.7)
        Verifier.from_jwks_file(jwks)
    jwks.write_text(json.dumps({"keys": [{**ed.public_jwk, "vid": "ANY-VIN"}]}))
    checker = MessageChecker(Verifier.from_jwks_file(jwks), "fleet/eu")
    record = checker.check("fleet/eu/ANY-VIN/events", ed.sign(make_claims(1, vid="ANY-VIN")).encode())
    assert record["verified"] and record["alg"] == "EdDSA" and record["vid"] == "ANY-VIN"
    assert "unexpected topic" in checker.check("vehicles/VIN1/events", b"x")["rejected"]
    bad_alg = ed.sign(make_claims(2, vid="ANY-VIN")).split(".")
    header = json.loads(b64url_decode(bad_alg[0]))
    header["alg"] = "ES256"
    bad_alg[0] = b64url_encode(json.dumps(header).encode())
    assert checker.check("fleet/eu/ANY-VIN/events", ".".join(bad_alg).encode())["rejected"] \
        .startswith("alg mismatch")


def test_status_variants(checker) -> None:
    assert checker.check("vehicles/VIN1/status", b"offline")["status"] == "offline"
    record = checker.check("vehicles/VIN1/status", b'{"status": "online", "boot": 4}')
    assert record["status"] == "online" and record["detail"] == {"status": "online", "boot": 4}
    assert checker.check("vehicles/VIN1/status", b"\xff")["rejected"].startswith("malformed")
    assert "not a valid vehicle id" in checker.check("vehicles/a b/status", b"on")["rejected"]


def test_format_human_escapes_control_characters() -> None:
    line = format_human({"vid": "VIN1", "topic": "vehicles/VIN1/status", "kind": "status",
                         "status": "on\x1b[2Jline", "retained": True})
    assert "\x1b" not in line and line.startswith("VIN1 status on\\x1b[2Jline")
    assert line.endswith("(retained)")


def test_describe_tls_alert() -> None:
    assert describe_tls_alert("failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]"
                              " tlsv13 alert certificate required (_ssl.c:2580)") == (
        "broker refused the client certificate: TLSV13_ALERT_CERTIFICATE_REQUIRED "
        "(no client certificate was sent)")
    assert describe_tls_alert("[SSL: TLSV1_ALERT_PROTOCOL_VERSION] x").startswith("TLS handshake")
    assert describe_tls_alert("[SSL: CERTIFICATE_VERIFY_FAILED] x") is None
    assert describe_tls_alert("connection reset") is None


# --------------------------------------------------------------------------- SeqTracker


def test_seq_tracker_in_order_and_out_of_order() -> None:
    tracker = SeqTracker()
    assert [tracker.accept("V", s) for s in (1, 2, 4, 3, 3, 5, 1, 7)] == [
        True, True, True, True, False, True, False, True]
    assert tracker.watermark("V") == 5
    assert tracker.seen("V", 7) and not tracker.seen("V", 6)
    assert tracker.why_rejected("V", 3) == "duplicate seq 3"
    assert tracker.accept("OTHER", 1)  # per vehicle
    assert tracker.watermark("NEW") == 0


def test_seq_tracker_late_start_and_window() -> None:
    tracker = SeqTracker(window=4)
    # Watching starts at seq 100: 1..99 never come; memory stays bounded anyway.
    for seq in range(100, 110):
        assert tracker.accept("V", seq)
    assert len(tracker._above["V", ""]) <= 4
    assert tracker.watermark("V") >= 105
    assert not tracker.accept("V", 50)  # behind the window now
    assert tracker.why_rejected("V", 50).startswith("duplicate or too old seq 50")
    assert not tracker.accept("V", 109)
    assert tracker.why_rejected("V", 109) == "duplicate seq 109"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=120), st.randoms())
def test_seq_tracker_accepts_each_distinct_seq_exactly_once(seqs, rnd) -> None:
    rnd.shuffle(seqs)
    tracker = SeqTracker()
    accepted = [seq for seq in seqs if tracker.accept("V", seq)]
    assert sorted(accepted) == sorted(set(seqs))
    if set(seqs) == set(range(1, len(set(seqs)) + 1)):
        assert tracker.watermark("V") == len(set(seqs))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200), max_size=200),
       st.integers(min_value=2, max_value=8))
def test_seq_tracker_never_accepts_twice_even_with_a_tiny_window(seqs, window) -> None:
    tracker = SeqTracker(window=window)
    accepted = [seq for seq in seqs if tracker.accept("V", seq)]
    assert len(accepted) == len(set(accepted))
    assert len(tracker._above.get("V", ())) <= window
