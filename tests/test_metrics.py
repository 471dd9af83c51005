"""The metrics topic as the cloud receives it from a running agent: its schema and values."""

from __future__ import annotations

import json

import pytest
from cryptography import x509

from agent.dev.simulate import write_capture
from agent.signals.vehicle import load_vehicle
from support.agent_run import DEMO, start_agent, write_agent_config
from support.subscriber import Subscriber

pytestmark = pytest.mark.mqtt

TOPIC = "vehicles/VIN1/metrics"
NUMBER = (int, float)


def test_metrics_payload_schema(tmp_path, pki, broker):
    capture = tmp_path / "drive.log"
    write_capture(load_vehicle(DEMO), capture, 60.0, seed=3)
    config = write_agent_config(tmp_path, pki, broker.port, capture=capture, realtime=True,
                                extra="logging: {stats_interval_s: 1}")
    with Subscriber(pki, broker.port, TOPIC) as cloud:
        agent = start_agent(config)
        try:
            got = cloud.wait_count(TOPIC, 2, timeout=30)
        finally:
            agent.terminate()
            agent.communicate(timeout=60)
    assert all(m.qos == 0 and not m.retain for m in got)
    metrics = json.loads(got[-1].payload)
    assert set(metrics) >= {"ts", "frames_per_s", "source", "decode", "outbox", "certificate",
                            "log_lines_suppressed"}
    assert type(metrics["ts"]) is int and metrics["ts"] > 1_700_000_000_000
    assert isinstance(metrics["frames_per_s"], NUMBER) and metrics["frames_per_s"] > 0
    # A capture source: its path and how far it got.
    assert metrics["source"]["capture"] == str(capture)
    assert type(metrics["source"]["frames"]) is int and metrics["source"]["frames"] > 0
    assert metrics["source"]["malformed"] == 0
    decode = metrics["decode"]
    assert {"frames", "decoded", "error_frames", "wrong_length"} <= set(decode)
    assert all(type(v) is int and v >= 0 for v in decode.values()), decode
    assert 0 < decode["decoded"] <= decode["frames"]
    outbox = metrics["outbox"]
    assert set(outbox) >= {"queued", "bytes", "dropped_full", "dropped_age", "refused",
                           "store_errors"}
    stream = outbox.pop("stream")       # the outbox's random stream id, signed as "stream"
    assert isinstance(stream, str) and len(stream) == 20 and int(stream, 16) >= 0
    assert all(type(v) is int for v in outbox.values()), outbox
    assert (outbox["dropped_full"], outbox["dropped_age"], outbox["refused"],
            outbox["store_errors"]) == (0, 0, 0, 0)
    # The client certificate's expiry, as the certificate itself says.
    expires = x509.load_pem_x509_certificate((pki / "VIN1.crt").read_bytes()).not_valid_after_utc
    assert metrics["certificate"] == {"expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                      "warning": None}
    assert metrics["log_lines_suppressed"] == 0
