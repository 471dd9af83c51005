"""`car-agent run` end to end: a real mosquitto with mTLS, the agent as a subprocess, the cloud
watcher verifying what arrives. Nothing here is mocked."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jwcrypto import jwk, jws

from agent.cloud.config import load_cloud_config
from agent.cloud.watch import CloudWatcher
from agent.dev.pki import init_pki, issue_client_cert
from agent.dev.simulate import write_capture
from agent.signals.state import SignalPipeline
from agent.signals.vehicle import load_vehicle
from agent.can.capture import open_capture

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo.yaml"

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> Path:
    """A 30 s simulated drive (seed 3), shared by the tests of this module."""
    path = tmp_path_factory.mktemp("drive") / "drive.log"
    write_capture(load_vehicle(DEMO), path, 30.0, seed=3)
    return path


def agent_config(tmp_path: Path, pki: Path, port: int, capture: Path, *, vid: str = "VIN1",
                 cert: Path | None = None, key: Path | None = None, ca: Path | None = None,
                 realtime: bool = False, policy: str = "", name: str = "agent.yaml") -> Path:
    cert = cert or pki / f"{vid}.crt"
    key = key or pki / f"{vid}.key"
    path = tmp_path / name
    path.write_text(f"""\
vehicle_id: {vid}
can: {{capture: {capture}, realtime: {str(realtime).lower()}}}
dbc: [{ROOT / 'dbc' / 'demo_vehicle.dbc'}]
mapping: {ROOT / 'config' / 'mapping' / 'demo_vehicle.yaml'}
signing: {{key: {pki / f'{vid}.signing.key' if (pki / f'{vid}.signing.key').exists() else pki / 'VIN1.signing.key'}}}
mqtt: {{host: 127.0.0.1, port: {port}, ca: {ca or pki / 'ca.crt'}, cert: {cert}, key: {key},
        reconnect_min_s: 0.2, reconnect_max_s: 1}}
store: {{path: {tmp_path / 'outbox.db'}}}
{policy}
""")
    return path


def run_agent(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class Collector:
    """A CloudWatcher collecting every record it produces."""

    def __init__(self, cloud_yaml: Path) -> None:
        self.records: list[dict] = []
        self.problems: list[str] = []
        self.raw: list[tuple[str, bytes]] = []
        self.watcher = CloudWatcher(load_cloud_config(cloud_yaml), self.records.append,
                                    on_problem=self.problems.append)
        check = self.watcher.checker.check

        def keep_raw(topic, payload, retained=False):
            self.raw.append((topic, payload))
            return check(topic, payload, retained)

        self.watcher.checker.check = keep_raw

    def __enter__(self) -> "Collector":
        self.watcher.start()
        assert self.watcher.connected.wait(10), self.problems
        return self

    def __exit__(self, *exc) -> None:
        self.watcher.stop()

    def verified(self, kind: str | None = None) -> list[dict]:
        return [r for r in self.records if r.get("verified")
                and (kind is None or r.get("kind") == kind)]

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


def expected_final_values(capture: Path) -> dict:
    """The last value of every signal, by decoding the capture offline."""
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
        assert cloud.wait_for(lambda: any(r.get("status") == "offline" for r in cloud.records))
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
    assert final_state["signals"]["Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"] is True
    assert final_state["signals"]["Vehicle.Body.Trunk.Rear.IsOpen"] is True
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


def test_broker_outage_and_kill9_lose_no_seq(tmp_path, pki, broker, cloud_config, drive):
    # A busy policy: many messages, so the outage and the kill hit traffic in flight.
    policy = ("policy: {min_interval_s: 0, snapshot_min_interval_s: 0.2, heartbeat_s: 1, "
              "max_messages_per_s: 50, deadband: {'*': 0}}")
    config = agent_config(tmp_path, pki, broker.port, drive, realtime=True, policy=policy)
    with Collector(cloud_config()) as cloud:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert cloud.wait_for(lambda: len(cloud.verified()) >= 10, 20)
            broker.kill()                        # outage: the agent keeps queueing
            time.sleep(2.0)
            agent.send_signal(signal.SIGSTOP)    # keep it from reconnecting before the cloud
            broker.restart()
            assert cloud.watcher.connected.wait(15), cloud.problems
            agent.send_signal(signal.SIGCONT)
            time.sleep(3.0)
            agent.send_signal(signal.SIGKILL)    # a crash: no flush, no goodbye
            agent.wait(10)
        finally:
            if agent.poll() is None:
                agent.kill()
            agent.stderr.close()
        before_restart = max(r["seq"] for r in cloud.verified())
        # Restart: replays the capture again (as fast as possible) and drains the outbox.
        fast = agent_config(tmp_path, pki, broker.port, drive, policy=policy)
        result = run_agent(fast)
        assert result.returncode == 0, result.stderr
        assert cloud.wait_for(lambda: any(r.get("status") == "offline"
                                          for r in cloud.records[-3:]))
    seqs = {r["seq"] for r in cloud.verified()}
    assert seqs == set(range(1, max(seqs) + 1)), \
        f"missing seqs: {sorted(set(range(1, max(seqs) + 1)) - seqs)[:20]}"
    assert max(seqs) > before_restart
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
                                                         drive, foreign, case):
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
        time.sleep(0.5)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "stay queued" in result.stderr
    assert "Traceback" not in result.stderr
    assert cloud.records == []


def test_acl_denial_is_a_failure_not_a_delivery(tmp_path, pki, broker, cloud_config, drive):
    # VIN1's certificate, but configured as VIN2: every publish lands outside vehicles/VIN1/#.
    config = agent_config(tmp_path, pki, broker.port, drive, vid="VIN2",
                          cert=pki / "VIN1.crt", key=pki / "VIN1.key")
    with Collector(cloud_config()) as cloud:
        result = run_agent(config, "--drain-timeout", "3")
        time.sleep(0.5)
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
        assert stats.failed >= 1


def test_credential_rotation_without_restart_loses_nothing(tmp_path, pki, broker, cloud_config,
                                                           drive):
    """The client certificate and key are replaced on disk while the agent runs: it reconnects
    with the new ones by itself and every seq still arrives."""
    import shutil

    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("VIN1.crt", "VIN1.key"):
        shutil.copy2(pki / name, creds / name)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    new_cert, new_key = issue_client_cert(fresh, "VIN1", ca_dir=pki)
    policy = "policy: {min_interval_s: 0, snapshot_min_interval_s: 0.5, heartbeat_s: 2}"
    config = agent_config(tmp_path, pki, broker.port, drive, realtime=True, policy=policy,
                          cert=creds / "VIN1.crt", key=creds / "VIN1.key")
    with Collector(cloud_config()) as cloud:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert cloud.wait_for(lambda: len(cloud.verified()) >= 5, 20)
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
        assert cloud.wait_for(lambda: any(r.get("status") == "offline"
                                          for r in cloud.records[-3:]))
    seqs = {r["seq"] for r in cloud.verified()}
    assert seqs == set(range(1, max(seqs) + 1))
    assert broker.log_text().count("New client connected") >= 0   # broker saw both sessions


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
