"""README promises of `car-agent run` at its edges: SIGINT and SIGTERM stop it with a final
snapshot, then ``offline``; a TLS key readable by others is refused before anything starts."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from agent.dev.broker import free_port
from agent.dev.simulate import write_capture
from agent.signals.vehicle import load_vehicle
from support.agent_run import DEMO, Collector, run_agent, start_agent, write_agent_config

pytestmark = pytest.mark.mqtt

# No snapshot on change and no heartbeat while the test runs: a snapshot can only come from
# the stop itself.
QUIET_SNAPSHOTS = "policy: {snapshot_min_interval_s: 1000, heartbeat_s: 1000}"


@pytest.fixture(scope="module")
def long_drive(tmp_path_factory) -> Path:
    """A 60 s drive: the agent, in real time, is still reading it when the signal comes."""
    path = tmp_path_factory.mktemp("drive") / "drive.log"
    write_capture(load_vehicle(DEMO), path, 60.0, seed=7)
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_sends_a_final_snapshot_then_offline_and_exits_0(
        tmp_path, pki, broker, cloud_config, long_drive, signum):
    config = write_agent_config(tmp_path, pki, broker.port, capture=long_drive, realtime=True,
                                policy=QUIET_SNAPSHOTS)
    with Collector(cloud_config()) as cloud:
        agent = start_agent(config)
        try:
            # Running: the first events (doors, locks: immediate) are out.
            assert cloud.wait_for(lambda: len(cloud.verified("event")) >= 2, 30), cloud.problems
            assert cloud.verified("state") == []
            agent.send_signal(signum)
            _, stderr = agent.communicate(timeout=60)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
        assert cloud.wait_offline()
    assert agent.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip("\n").split("\n")[-1] == "car-agent run: stopped; outbox empty"
    signed = cloud.verified()
    states = cloud.verified("state")
    # One snapshot, the stop's: the last signed message, with every mapped signal, followed
    # by the retained offline status.
    assert len(states) == 1
    final = states[0]
    assert final["seq"] == max(r["seq"] for r in signed)
    assert set(final["signals"]) == set(load_vehicle(DEMO).decoder().paths)
    order = [("state" if r.get("kind") == "state" else r.get("status"))
             for r in cloud.records if r.get("kind") == "state" or r.get("status")]
    assert order[-2:] == ["state", "offline"]
    assert sorted(r["seq"] for r in signed) == list(range(1, len(signed) + 1))


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604])
def test_a_tls_key_readable_by_others_is_refused_at_start(tmp_path, pki, mode):
    key = tmp_path / "mqtt.key"
    shutil.copy2(pki / "VIN1.key", key)
    os.chmod(key, mode)
    capture = tmp_path / "drive.log"
    write_capture(load_vehicle(DEMO), capture, 1.0, seed=1)
    config = write_agent_config(tmp_path, pki, free_port(), capture=capture, key=key)
    result = run_agent(config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(key) in lines[0] and f"mode {mode:04o}" in lines[0]
    assert "mqtt.key" in lines[0]
    assert not (tmp_path / "outbox.db").exists()          # refused before anything started
