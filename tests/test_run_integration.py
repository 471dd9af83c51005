"""`car-agent run` end to end: a real mosquitto with mTLS, the agent as a subprocess, the cloud
watcher verifying what arrives. Nothing here is mocked."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import time
from pathlib import Path

import pytest
from jwcrypto import jwk, jws

from agent.dev.pki import init_crl, init_pki, issue_client_cert, revoke
from agent.dev.simulate import write_capture
from agent.signals.state import SignalPipeline
from agent.signals.vehicle import load_vehicle
from agent.can.capture import open_capture
from agent.uplink.tlsdiag import probe_tls12
from support.agent_run import (DEMO, Collector, queued_seqs, run_agent, start_agent,
                               write_agent_config)
from support.handdecode import final_values
from support.waiting import wait_for

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> Path:
    """A 30 s simulated drive (seed 3), shared by the tests of this module."""
    path = tmp_path_factory.mktemp("drive") / "drive.log"
    write_capture(load_vehicle(DEMO), path, 30.0, seed=3)
    return path


def agent_config(tmp_path: Path, pki: Path, port: int, capture: Path, **kwargs) -> Path:
    return write_agent_config(tmp_path, pki, port, capture=capture, **kwargs)


def expected_final_values(capture: Path) -> dict:
    """The last value of every signal, by decoding the capture offline (a wiring check: the
    project's own pipeline; :mod:`support.handdecode` is the independent expectation)."""
    pipeline = SignalPipeline(load_vehicle(DEMO).decoder())
    final = {}
    with open_capture(capture) as reader:
        for change in pipeline.run(reader):
            final[change.path] = (change.value, change.quality)
    return final


def test_every_message_is_signed_verifiable_and_complete(tmp_path, pki, broker, cloud_config,
                                                         drive):
    with Collector(cloud_config()) as cloud:
        result = run_agent(agent_config(tmp_path, pki, broker.port, drive))
        assert result.returncode == 0, result.stderr
        assert "outbox empty" in result.stderr
        assert cloud.wait_offline()
    rejected = [r for r in cloud.records if "rejected" in r]
    assert rejected == []
    signed = cloud.verified()
    seqs = sorted(r["seq"] for r in signed)
    assert seqs == list(range(1, len(seqs) + 1)), "seq must start at 1 with no gap"
    assert len(seqs) > 10
    assert {r["boot"] for r in signed} == {1}
    assert {r["vid"] for r in signed} == {"VIN1"}

    # An independent JOSE implementation verifies the raw tokens too.
    keys = json.loads((pki / "jwks.json").read_text())["keys"]
    key = jwk.JWK(**next(k for k in keys if k.get("vid") == "VIN1"))
    tokens = [payload for topic, payload in cloud.raw if not topic.endswith("/status")]
    assert len(tokens) == len(signed)
    for raw in tokens:
        token = jws.JWS()
        token.deserialize(raw.decode())
        token.verify(key)       # raises if it does not verify
        header = token.jose_header
        assert header["alg"] == "ES256" and header["typ"] == "JWT" and header["kid"] == key.kid
        claims = json.loads(token.payload)
        assert set(claims) >= {"vid", "seq", "boot", "ts", "signals", "quality"}
        assert abs(claims["ts"] / 1000 - time.time()) < 300

    # The last snapshot equals what offline decoding says the car's final state is.
    final_state = max(cloud.verified("state"), key=lambda r: r["seq"])
    expected = expected_final_values(drive)
    for path, (value, quality) in expected.items():
        if quality == "valid":
            assert final_state["signals"][path] == value, path
        else:
            assert final_state["signals"][path] is None
            assert final_state["quality"][path] == quality
    # Independent of the project's decoder: the last frames' bytes decoded by hand.
    hand = final_values(drive)
    assert len(hand) == len(final_state["signals"]) == 19
    assert final_state["signals"] == hand
    assert final_state["quality"] == {}
    # ... and written down for this drive (seed 3, 30 s): what the car looks like at its end.
    assert {path: final_state["signals"][path] for path in (
        "Vehicle.Powertrain.FuelSystem.Range", "Vehicle.Powertrain.FuelSystem.RelativeLevel",
        "Vehicle.Powertrain.FuelSystem.AbsoluteLevel", "Vehicle.Exterior.AirTemperature",
        "Vehicle.Cabin.Door.Row1.DriverSide.Window.Position",
        "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen", "Vehicle.Body.Trunk.Rear.IsOpen",
        "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked")} == {
        "Vehicle.Powertrain.FuelSystem.Range": 515000,
        "Vehicle.Powertrain.FuelSystem.RelativeLevel": 60.8,
        "Vehicle.Powertrain.FuelSystem.AbsoluteLevel": 33.5,
        "Vehicle.Exterior.AirTemperature": 19.5,
        "Vehicle.Cabin.Door.Row1.DriverSide.Window.Position": 10,
        "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen": True,
        "Vehicle.Body.Trunk.Rear.IsOpen": True,
        "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked": False}
    # Door events went out as events, with booleans.
    door = [r["signals"]["Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"]
            for r in sorted(cloud.verified("event"), key=lambda r: r["seq"])
            if "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen" in r["signals"]]
    assert door == [False, True, False, True]


def test_late_subscriber_gets_retained_state_and_status(tmp_path, pki, broker, cloud_config,
                                                        drive):
    result = run_agent(agent_config(tmp_path, pki, broker.port, drive))
    assert result.returncode == 0, result.stderr
    with Collector(cloud_config()) as cloud:
        assert cloud.wait_for(lambda: len(cloud.verified("state")) >= 1
                              and any(r.get("status") for r in cloud.records))
    state = cloud.verified("state")
    assert len(state) == 1
    assert state[0]["signals"]["Vehicle.Body.Trunk.Rear.IsOpen"] is True
    assert set(state[0]["signals"]) == set(load_vehicle(DEMO).decoder().paths)
    assert [r["status"] for r in cloud.records if "status" in r] == ["offline"]


def test_broker_outage_and_kill9_lose_no_seq_and_resend_in_order(tmp_path, pki, broker,
                                                                  cloud_config, drive):
    # A busy policy: many messages, so the outage and the kill hit traffic in flight.
    policy = ("policy: {min_interval_s: 0, snapshot_min_interval_s: 0.2, heartbeat_s: 1, "
              "max_messages_per_s: 50, deadband: {'*': 0}}")
    config = agent_config(tmp_path, pki, broker.port, drive, realtime=True, policy=policy)
    outbox = tmp_path / "outbox.db"
    with Collector(cloud_config()) as cloud:
        agent = start_agent(config)
        try:
            assert cloud.wait_for(lambda: len(cloud.verified()) >= 10, 20)
            # 1. A broker outage while the agent runs: it keeps queueing, then delivers.
            broker.kill()
            assert wait_for(lambda: not cloud.watcher.connected.is_set())
            assert wait_for(lambda: len(queued_seqs(outbox)) >= 5, 20)
            agent.send_signal(signal.SIGSTOP)    # keep it from reconnecting before the cloud
            broker.restart()
            assert cloud.watcher.connected.wait(15), cloud.problems
            queued_in_outage = queued_seqs(outbox)
            agent.send_signal(signal.SIGCONT)
            assert cloud.wait_for(lambda: {r["seq"] for r in cloud.verified()}
                                  >= set(queued_in_outage), 20)
            # 2. A crash while messages are queued (broker down again): no flush, no goodbye.
            broker.kill()
            assert wait_for(lambda: not cloud.watcher.connected.is_set())
            # Enough that a few late PUBACKs (received before the broker died) leave some.
            assert wait_for(lambda: len(queued_seqs(outbox)) >= 10, 20)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
        finally:
            if agent.poll() is None:
                agent.kill()
            agent.stderr.close()
        # (Read after the kill: PUBACKs already received before the broker died may have
        # removed a few after the count above.)
        queued_at_kill = queued_seqs(outbox)
        assert queued_at_kill, "the outbox was empty at the SIGKILL: nothing to prove"
        assert queued_at_kill == list(range(queued_at_kill[0], queued_at_kill[-1] + 1))
        broker.restart()
        assert cloud.watcher.connected.wait(15), cloud.problems
        since = len(cloud.records)
        # Restart: replays the capture again (as fast as possible) and drains the outbox.
        result = run_agent(agent_config(tmp_path, pki, broker.port, drive, policy=policy))
        assert result.returncode == 0, result.stderr
        assert cloud.wait_offline(since)
    after = [r for r in cloud.records[since:] if "seq" in r]      # verified or duplicate
    arrived = [r["seq"] for r in after]
    # What the outbox held at the SIGKILL arrived after the restart, first and in seq order
    # (boot 1), followed by the new run's messages (boot 2), also in order.
    assert arrived[:len(queued_at_kill)] == queued_at_kill, arrived[:40]
    assert arrived == sorted(arrived), arrived
    assert {r["boot"] for r in after if r.get("verified") and r["seq"] in queued_at_kill} <= {1}
    seqs = {r["seq"] for r in cloud.verified()}
    assert seqs == set(range(1, max(seqs) + 1)), \
        f"missing seqs: {sorted(set(range(1, max(seqs) + 1)) - seqs)[:20]}"
    assert max(seqs) > queued_at_kill[-1]
    assert {r["boot"] for r in cloud.verified()} == {1, 2}
    assert [r for r in cloud.records if "rejected" in r
            and "duplicate" not in r["rejected"]] == []


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    other = tmp_path_factory.mktemp("foreign") / "pki"
    init_pki(other, ["VIN1"])
    return other


@pytest.mark.parametrize("case", ["foreign-ca-client-cert", "expired-client-cert",
                                  "untrusted-broker"])
def test_refused_credentials_say_why_and_publish_nothing(tmp_path, pki, broker, cloud_config,
                                                         mqtt_client, drive, foreign, case):
    import datetime as dt

    if case == "foreign-ca-client-cert":
        kwargs = {"cert": foreign / "VIN1.crt", "key": foreign / "VIN1.key"}
        expected = "TLSV1_ALERT_UNKNOWN_CA"
    elif case == "expired-client-cert":
        now = dt.datetime.now(dt.timezone.utc)
        expired = tmp_path / "expired"
        expired.mkdir()
        cert, key = issue_client_cert(expired, "VIN1", ca_dir=pki,
                                      not_before=now - dt.timedelta(days=30),
                                      not_after=now - dt.timedelta(days=1))
        kwargs = {"cert": cert, "key": key}
        expected = "expired"
    else:
        kwargs = {"ca": foreign / "ca.crt"}
        expected = "is not trusted"
    config = agent_config(tmp_path, pki, broker.port, drive, **kwargs)
    with Collector(cloud_config()) as cloud:
        result = run_agent(config, "--drain-timeout", "3")
        cloud.barrier(mqtt_client("VIN2"))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "stay queued" in result.stderr
    assert "Traceback" not in result.stderr
    assert cloud.records == []


def test_acl_denial_is_a_failure_not_a_delivery(tmp_path, pki, broker, cloud_config, mqtt_client,
                                                drive):
    # VIN1's certificate, but configured as VIN2: every publish lands outside vehicles/VIN1/#.
    config = agent_config(tmp_path, pki, broker.port, drive, vid="VIN2",
                          cert=pki / "VIN1.crt", key=pki / "VIN1.key")
    with Collector(cloud_config()) as cloud:
        result = run_agent(config, "--drain-timeout", "3")
        cloud.barrier(mqtt_client("VIN2"))
    assert result.returncode == 1, result.stderr
    assert "Not authorized" in result.stderr
    assert "stay queued" in result.stderr
    assert cloud.verified() == []
    # Nothing was deleted from the outbox: every message is still there for a later retry.
    from agent.uplink.outbox import Outbox
    with Outbox(tmp_path / "outbox.db") as outbox:
        stats = outbox.stats()
        assert stats.delivered == 0
        assert stats.queued > 0
        # Every refusal was recorded, and within the 3 s none was retried (30 s later only).
        assert 1 <= stats.failed <= stats.queued


def test_credential_rotation_uses_the_new_certificate_and_loses_nothing(
        tmp_path, broker_factory, cloud_config, drive):
    """The client certificate and key are replaced on disk while the agent runs. The old
    certificate is revoked at the broker first (the open connection stays), so the agent can
    only reconnect, and every seq only arrive, if it really uses the new one."""
    rpki = tmp_path / "rpki"
    init_pki(rpki, ["VIN1"])
    init_crl(rpki)
    crl_broker = broker_factory(rpki, extra_conf=f"crlfile {rpki / 'crl.pem'}")
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("VIN1.crt", "VIN1.key"):
        shutil.copy2(rpki / name, creds / name)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    new_cert, new_key = issue_client_cert(fresh, "VIN1", ca_dir=rpki)
    policy = "policy: {min_interval_s: 0, snapshot_min_interval_s: 0.5, heartbeat_s: 2}"
    config = agent_config(tmp_path, rpki, crl_broker.port, drive, realtime=True, policy=policy,
                          cert=creds / "VIN1.crt", key=creds / "VIN1.key")
    cloud_yaml = cloud_config(port=crl_broker.port, ca=rpki / "ca.crt", cert=rpki / "cloud.crt",
                              key=rpki / "cloud.key", trust=rpki / "jwks.json")
    with Collector(cloud_yaml) as cloud:
        agent = start_agent(config)
        try:
            assert cloud.wait_for(lambda: len(cloud.verified()) >= 5, 20)
            revoke(rpki, "VIN1", "superseded")          # the certificate in use now
            crl_broker.reload()
            # From now on a new connection with the old certificate is refused.
            assert wait_for(lambda: old_certificate_refused(rpki, creds, crl_broker.port), 10)
            before = len(cloud.verified())
            # Atomic replacement, as a provisioning client would do it.
            for src, dst in ((new_key, creds / "VIN1.key"), (new_cert, creds / "VIN1.crt")):
                shutil.copy2(src, dst.with_suffix(".tmp"))
                (dst.with_suffix(".tmp")).rename(dst)
            _, stderr = agent.communicate(timeout=90)
        finally:
            if agent.poll() is None:
                agent.kill()
        assert agent.returncode == 0, stderr
        assert "credentials changed on disk; reconnecting" in stderr
        assert "revoked" not in stderr
        assert cloud.wait_offline()
    assert len(cloud.verified()) > before
    seqs = {r["seq"] for r in cloud.verified()}
    assert seqs == set(range(1, max(seqs) + 1))
    # The broker saw the agent connect twice: once with each certificate.
    assert crl_broker.log_text().count("as VIN1 (p5") == 2


def old_certificate_refused(pki: Path, creds: Path, port: int) -> bool:
    """The broker refuses the certificate in ``creds`` as revoked (TLS 1.2 handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.load_cert_chain(creds / "VIN1.crt", creds / "VIN1.key")
    why = probe_tls12(ctx, "127.0.0.1", port)
    return why is not None and "revoked" in why


def test_broker_name_mismatch_is_explained(tmp_path, pki, drive, tmp_path_factory):
    """A broker on 127.0.0.2 with a certificate for localhost/127.0.0.1/::1: the agent refuses
    it (host name verification is always on) and says why."""
    from agent.dev.broker import DevBroker

    with DevBroker(pki, tmp_path_factory.mktemp("broker2"), host="127.0.0.2") as other:
        config = agent_config(tmp_path, pki, other.port, drive)
        config.write_text(config.read_text().replace("host: 127.0.0.1", "host: 127.0.0.2"))
        result = run_agent(config, "--drain-timeout", "2")
    assert result.returncode == 1
    assert "is not trusted: IP address mismatch, certificate is not valid for '127.0.0.2' " \
           "(its certificate names other hosts; check mqtt.host)" in result.stderr
    assert "Traceback" not in result.stderr
