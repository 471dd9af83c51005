"""Helpers for the serve suites: signed messages, a serve config, a running Service, waiting."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.cloud.config import load_cloud_config
from agent.cloud.serve import Service
from agent.uplink.signing import Signer

T0 = 1_764_000_000.0            # 2025-11-24T16:00:00Z: claims' ts is set from it
RANGE = "Vehicle.Powertrain.FuelSystem.Range"
FUEL = "Vehicle.Powertrain.FuelSystem.RelativeLevel"
DOOR = "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"
LOCK = "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"
WINDOW = "Vehicle.Cabin.Door.Row2.PassengerSide.Window.Position"
TRUNK = "Vehicle.Body.Trunk.Rear.IsOpen"
FULL = {RANGE: 423_600, FUEL: 63.4, DOOR: False, LOCK: True, WINDOW: 0, TRUNK: False}


def claims(seq: int, *, vid: str = "VIN1", kind: str = "state", ts: float | None = None,
           signals: dict | None = None, quality: dict | None = None,
           age: dict | None = None) -> dict[str, Any]:
    """Claims of a signed message; ``ts`` (s) defaults to T0 + seq."""
    c: dict[str, Any] = {"vid": vid, "seq": seq, "boot": 1,
                         "ts": int(((T0 + seq) if ts is None else ts) * 1000), "kind": kind,
                         "signals": signals if signals is not None else {},
                         "quality": quality or {}}
    if age is not None:
        c["age"] = age
    return c


def serve_yaml(folder: Path, pki: Path, port: int, *, store: str = "sqlite:///state.db",
               owners: Path | None = None, share_group: str | None = None,
               http: str = "listen: 127.0.0.1:0", name: str = "cloud", extra: str = "") -> Path:
    """A serve config in ``folder`` for the broker on ``port``; ``extra``: more lines."""
    lines = ["mqtt:", "  host: 127.0.0.1", f"  port: {port}", f"  ca: {pki / 'ca.crt'}",
             f"  cert: {pki / 'cloud.crt'}", f"  key: {pki / 'cloud.key'}",
             "  reconnect_min_s: 0.1", "  reconnect_max_s: 0.5"]
    if share_group:
        lines.append(f"  share_group: {share_group}")
    lines += [f"trust: {pki / 'jwks.json'}", f"store: {{url: '{store}'}}",
              "http: {" + http + "}"]
    if owners is not None:
        lines.append(f"owners: {owners}")
    if extra:
        lines.append(extra)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_service(config: Path, name: str | None = None) -> Service:
    service = Service(load_cloud_config(config), name=name).start()
    assert service.ingest.watcher.connected.wait(10), service.ingest.watcher.last_problem
    assert service.ingest.ready.wait(40)
    return service


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Wait until ``condition()`` is truthy (it is looked at every 20 ms); return its value."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        event.wait(0.02)


def metric(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def get(service: Service, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    method = kwargs.pop("method", "GET")
    return httpx.request(method, service.url + path, headers=headers, timeout=20, **kwargs)


def sign(signer: Signer, c: dict[str, Any]) -> bytes:
    return signer.sign(c).encode("ascii")


def fake_car(mqtt_client, signer, answers: bool):
    """VIN1's client subscribed to its snapshot requests; with ``answers``, each is answered
    with a signed snapshot on the request's response topic, echoing its correlation data."""
    car = mqtt_client("VIN1")
    requests: list[Properties] = []
    subscribed = threading.Event()
    seq = iter(range(100, 200))

    def on_message(client, userdata, msg) -> None:
        requests.append(msg.properties)
        if answers:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = msg.properties.CorrelationData
            token = sign(signer, claims(next(seq), kind="snapshot",
                                        signals=dict(FULL, **{FUEL: 12.5})))
            client.publish(msg.properties.ResponseTopic, token, qos=1, properties=props)

    car.client.on_message = on_message
    car.client.on_subscribe = lambda *args: subscribed.set()
    car.client.subscribe("vehicles/VIN1/cmd/snapshot", qos=1)
    assert subscribed.wait(5)
    return car, requests
