"""``car-agent status`` (issue 9.3) through a real mosquitto with mTLS: fresh, old (refreshed by
a running agent), old with the car offline, forged, revoked and unknown state.

Retained states are signed here with the vehicle's real signing key and published with the
vehicle's certificate, as the agent would; the refreshed case runs the real agent pipeline
(tests/test_snapshot.py: RunningAgent) on a virtual CAN bus fed known frames.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from agent.dev.pki import revoke
from agent.uplink.signing import Signer, b64url_decode, b64url_encode
from coredata import BODY_ID, CLUSTER_ID, OPEN, RANGE, REL, REPO, body_payload, cluster_payload
from support.live_agent import RunningAgent
from support.waiting import wait_for

pytestmark = pytest.mark.mqtt

D1 = "Vehicle.Cabin.Door.Row1.DriverSide"


@pytest.fixture(scope="module")
def signer(pki) -> Signer:
    return Signer.from_file(pki / "VIN1.signing.key")


def state_token(signer: Signer, *, seq: int, ts: float, fuel: float, range_m: int,
                door_open: bool = False, vid: str = "VIN1") -> bytes:
    claims = {"vid": vid, "seq": seq, "boot": 1, "ts": int(ts * 1000), "kind": "state",
              "signals": {REL: fuel, RANGE: range_m, f"{D1}.IsOpen": door_open,
                          f"{D1}.IsLocked": True},
              "quality": {}, "age": {REL: 0.0, RANGE: 0.0, f"{D1}.IsOpen": 0.0,
                                     f"{D1}.IsLocked": 0.0}}
    return signer.sign(claims).encode()


def status(*args: str) -> tuple[int, str, str]:
    """``car-agent status ...`` as a user runs it: (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, "-m", "agent", "status", *args],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    return result.returncode, result.stdout, result.stderr


def test_fresh_state_is_answered_from_the_retained_message(broker, mqtt_client, cloud_config,
                                                           signer):
    vin1 = mqtt_client("VIN1")
    assert not vin1.publish("vehicles/VIN1/status", b"online", retain=True).is_failure
    token = state_token(signer, seq=41, ts=time.time() - 20, fuel=63.4, range_m=423_600,
                        door_open=True)
    assert not vin1.publish("vehicles/VIN1/state", token, retain=True).is_failure
    config = str(cloud_config())
    code, out, err = status("VIN1", "--config", config)
    assert code == 0, err
    assert out.startswith("As of 2") and out.endswith(
        ": about 420 km of range, 63% fuel. Open: driver's door. The car is online. "
        "Signature verified.\n"), out
    code, out, err = status("VIN1", "--config", config, "--json", "--lang", "zh")
    assert code == 0, err
    result = json.loads(out)
    assert (result["vid"], result["lang"], result["range_m"], result["fuel_pct"]) == \
        ("VIN1", "zh", 423_600, 63.4)
    assert (result["open"], result["unlocked"], result["online"], result["verified"]) == \
        ([f"{D1}.IsOpen"], [], True, True)
    assert result["source"]["seq"] == 41 and 20 <= result["age_s"] < 300
    assert "续航约420公里" in result["text"] and result["ssml"] is None
    assert err == ""
    # A terminal that cannot show Chinese gets it escaped, not a traceback.
    ascii_run = subprocess.run([sys.executable, "-m", "agent", "status", "VIN1", "--config", config,
                                "--lang", "zh"], capture_output=True, timeout=60, cwd=REPO,
                               env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert ascii_run.returncode == 0, ascii_run.stderr
    assert ascii_run.stdout.decode("ascii").startswith("\\u6570\\u636e")      # 数据


def test_old_state_is_refreshed_by_the_running_agent(tmp_path, pki, broker, mqtt_client,
                                                     cloud_config, signer):
    with RunningAgent(tmp_path, pki, broker.port) as car:
        car.keep_sending({CLUSTER_ID: cluster_payload(fuel=100, range_km=512, litres=300),  # 40 %
                          BODY_ID: body_payload(doors=(OPEN, 0, 0, 0), locks=(1, 1, 1, 1))})
        assert wait_for(lambda: car.agent.pipeline.state.snapshot(time.time())[RANGE]["value"]
                     == 512_000)
        # The state retained from an hour ago, seq 1 of the same outbox (the agent itself sends
        # no state here: heartbeat 1 h; its events took the next seqs of this boot).
        token = state_token(signer, seq=1, ts=time.time() - 3600, fuel=20.0,
                            range_m=150_000)
        assert not mqtt_client("VIN1").publish("vehicles/VIN1/state", token,
                                               retain=True).is_failure
        code, out, err = status("VIN1", "--config", str(cloud_config()), "--json")
        assert code == 0 and err == "", err
        result = json.loads(out)
        assert (result["fuel_pct"], result["range_m"], result["open"]) == \
            (40.0, 512_000, [f"{D1}.IsOpen"])
        assert result["age_s"] < 3600 and result["online"] is True
        assert result["source"]["seq"] > 1              # the snapshot's, from the agent's outbox
        assert car.agent.uplink.requests.counters.answered == 1
        assert err == ""


def test_old_state_of_an_offline_car_is_answered_with_a_note_without_asking(
        broker, mqtt_client, cloud_config, signer):
    vin1 = mqtt_client("VIN1")
    assert not vin1.publish("vehicles/VIN1/status", b"offline", retain=True).is_failure
    token = state_token(signer, seq=7, ts=time.time() - 3 * 3600, fuel=55.0, range_m=80_400)
    assert not vin1.publish("vehicles/VIN1/state", token, retain=True).is_failure
    code, out, err = status("VIN1", "--config", str(cloud_config()))
    assert code == 0, err
    assert out == ("As of 3 h ago: about 80 km of range, 55% fuel. Everything is closed and locked. "
                   "The car is offline; this is its last report. Signature verified.\n")
    assert err.startswith("car-agent status: the state is 108") and \
        err.endswith(" s old and VIN1 is offline; answering from it\n")


def _forged(signer: Signer) -> bytes:
    header, payload, sig = state_token(signer, seq=5, ts=time.time(), fuel=90.0,
                                       range_m=800_000).decode().split(".")
    claims = json.loads(b64url_decode(payload))
    claims["signals"][REL] = 100.0
    return ".".join([header, b64url_encode(json.dumps(claims).encode()), sig]).encode()


@pytest.mark.parametrize("car, why", [
    (b"offline", "VIN1 is offline"),                       # not asked
    (b"online", "no answer to a snapshot request within 5 s"),   # asked; nobody answers
])
def test_forged_state_is_refused_with_one_line_and_exit_3(broker, mqtt_client, cloud_config,
                                                          signer, car, why):
    vin1 = mqtt_client("VIN1")
    assert not vin1.publish("vehicles/VIN1/status", car, retain=True).is_failure
    assert not vin1.publish("vehicles/VIN1/state", _forged(signer), retain=True).is_failure
    code, out, err = status("VIN1", "--config", str(cloud_config()))
    assert (code, out) == (3, "")
    assert err == ("car-agent status: error: no verified state for VIN1: the retained state on "
                   f"vehicles/VIN1/state was rejected: bad signature; {why}\n")


def test_revoked_signing_key_is_refused(tmp_path, pki, broker, mqtt_client, cloud_config, signer):
    revoked = tmp_path / "pki"
    shutil.copytree(pki, revoked)          # same CA: its CRL is valid for the broker's CA
    crl = revoke(revoked, "VIN1", "key-compromise")
    vin1 = mqtt_client("VIN1")
    assert not vin1.publish("vehicles/VIN1/status", b"offline", retain=True).is_failure
    token = state_token(signer, seq=3, ts=time.time(), fuel=50.0, range_m=300_000)
    assert not vin1.publish("vehicles/VIN1/state", token, retain=True).is_failure
    config = cloud_config(extra=f"crl: {crl}\n")
    code, out, err = status("VIN1", "--config", str(config))
    assert (code, out) == (3, "")
    assert err.startswith("car-agent status: error: no verified state for VIN1: the retained "
                          "state on vehicles/VIN1/state was rejected: ")
    assert "revoked" in err and len(err.splitlines()) == 1
    # The same state without the CRL is verified: the refusal is the revocation's.
    code, out, err = status("VIN1", "--config", str(cloud_config()))
    assert code == 0 and "50% fuel" in out


def test_unknown_vehicle_and_bad_arguments(broker, cloud_config):
    config = str(cloud_config())
    code, out, err = status("VIN9", "--config", config)
    assert (code, out) == (3, "")
    assert err == ("car-agent status: error: no verified state for VIN9: nothing retained on "
                   "vehicles/VIN9/state (unknown vehicle, or it never published); no answer to "
                   "a snapshot request within 5 s\n")
    code, out, err = status("VIN1/#", "--config", config)
    assert code == 2 and err.startswith("car-agent status: error: 'VIN1/#' is not a valid vehicle id")
    code, out, err = status("VIN1", "--config", config, "--max-age", "-1")
    assert code == 2 and "--max-age: expected 0 or a positive number, got '-1'" in err


def test_no_broker_is_one_line_and_exit_1(cloud_config):
    from agent.dev.broker import free_port

    code, out, err = status("VIN1", "--config", str(cloud_config(port=free_port())))
    assert (code, out) == (1, "")
    assert err.startswith("car-agent status: error: ") and len(err.splitlines()) == 1
