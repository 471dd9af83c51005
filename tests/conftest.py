"""Shared fixtures: a development PKI, a real mosquitto with mTLS, cloud configs for it.

``broker`` skips when mosquitto is not installed, except in CI (``CI=true``), where a
missing broker is a failure: the integration tests must not silently vanish there.
"""

from __future__ import annotations

import os
import ssl
import threading
from pathlib import Path
from typing import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from hypothesis import settings
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.dev.broker import DevBroker, find_mosquitto
from agent.dev.pki import init_pki

VEHICLES = ["VIN1", "VIN2"]

# CI runs every property test derandomised (the same examples on every run, reproducible);
# locally Hypothesis explores new examples each time.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

# tests/guest needs a kernel with vcan: `make test` runs it inside tools/vcan-vm with
# CAR_AGENT_IN_VCAN=1; a plain `pytest tests` on a host without vcan leaves it out.
collect_ignore = [] if os.environ.get("CAR_AGENT_IN_VCAN") == "1" else ["guest"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development PKI (CA, broker, cloud, VIN1, VIN2, jwks.json) shared by the session.

    Treat it as read-only; tests that need more certificates make their own directory.
    """
    directory = tmp_path_factory.mktemp("pki") / "dev"
    init_pki(directory, VEHICLES)
    return directory


def require_mosquitto() -> None:
    """Skip without mosquitto, except in CI, where the integration tests must not vanish."""
    if find_mosquitto() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto missing in CI")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture
def broker(pki: Path, tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[DevBroker]:
    """A running DevBroker on the session PKI; stopped afterwards even if the test fails.

    On failure its log is attached to the test report (section "mosquitto log").
    """
    yield from running_broker(DevBroker(pki, tmp_path_factory.mktemp("broker")), request)


def running_broker(dev: DevBroker, request: pytest.FixtureRequest) -> Iterator[DevBroker]:
    """Start ``dev`` for one test, stop it afterwards, attach its log if the test failed."""
    require_mosquitto()
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            request.node.add_report_section("teardown", "mosquitto log", dev.log_text()[-20000:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def cloud_config(tmp_path: Path, pki: Path, broker: DevBroker) -> Callable[..., Path]:
    """Factory: write a cloud (watcher) YAML for the running broker and return its path.

    Keyword arguments override entries: ``ca``, ``cert``, ``key``, ``trust``, ``port``,
    ``host``, ``topic_prefix``; ``extra`` is appended verbatim (to test config errors).
    """
    counter = iter(range(1_000_000))

    def make(*, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
             trust: Path | None = None, port: int | None = None, host: str = "127.0.0.1",
             topic_prefix: str | None = None, extra: str = "") -> Path:
        lines = [
            "mqtt:",
            f"  host: {host}",
            f"  port: {port if port is not None else broker.port}",
            f"  ca: {ca or pki / 'ca.crt'}",
            f"  cert: {cert or pki / 'cloud.crt'}",
            f"  key: {key or pki / 'cloud.key'}",
            "  reconnect_min_s: 0.1",
            "  reconnect_max_s: 0.5",
        ]
        if topic_prefix is not None:
            lines.append(f"  topic_prefix: {topic_prefix}")
        lines.append(f"trust: {trust or pki / 'jwks.json'}")
        path = tmp_path / f"cloud-{next(counter)}.yaml"
        path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
        return path

    return make


class VehicleClient:
    """A paho MQTT 5 client with a certificate, for publishing in tests.

    :meth:`publish` waits for the PUBACK and returns its reason code, so ACL denials are
    visible (0x87 "Not authorized"; only MQTT 5 at QoS 1 reports them).
    """

    def __init__(self, port: int, ca: Path, cert: Path, key: Path, client_id: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(cert, key)
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.connack: ReasonCode | None = None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(ctx)
        client.on_publish = self._on_publish
        client.on_connect = self._on_connect
        self.client = client
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        if not self._connected.wait(5):
            self.close()
            raise TimeoutError(f"{client_id}: no CONNACK within 5 s")
        if self.connack is not None and self.connack.is_failure:
            self.close()
            raise ConnectionError(f"{client_id}: broker refused: {self.connack}")

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self.connack = reason
        self._connected.set()

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False,
                qos: int = 1, timeout: float = 5.0) -> ReasonCode:
        """Publish and wait for the acknowledgement; return its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout):
                raise TimeoutError(f"no PUBACK for {topic} within {timeout} s")
            return self._acks.pop(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_client(pki: Path, broker: DevBroker) -> Iterator[Callable[..., VehicleClient]]:
    """Factory: ``mqtt_client("VIN1")`` is a connected client with VIN1's certificate.

    ``cert_dir`` selects another directory holding ``<name>.crt``/``<name>.key``; clients are
    closed after the test.
    """
    clients: list[VehicleClient] = []
    counter = iter(range(1_000_000))

    def make(name: str, *, cert_dir: Path | None = None, port: int | None = None) -> VehicleClient:
        folder = cert_dir or pki
        client = VehicleClient(port or broker.port, pki / "ca.crt", folder / f"{name}.crt",
                               folder / f"{name}.key", f"test-{name}-{next(counter)}")
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
