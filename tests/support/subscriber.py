"""A paho MQTT 5 subscriber that collects every message it receives (the cloud's view)."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from support.waiting import wait_for


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Subscriber:
    """Connects with ``cert``/``key`` (default: the dev PKI's ``cloud`` identity), subscribes
    to ``topic`` at QoS 1 and keeps what arrives in :attr:`messages`. A context manager."""

    def __init__(self, pki: Path, port: int, topic: str = "vehicles/#", *,
                 name: str = "cloud") -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki / "ca.crt")
        ctx.load_cert_chain(pki / f"{name}.crt", pki / f"{name}.key")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-subscriber-{id(self)}",
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(ctx)
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *args: self._subscribed.set()
        client.on_message = self._on_message
        self.client = client
        self._port = port

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, message.payload, message.qos,
                                          bool(message.retain)))

    def __enter__(self) -> "Subscriber":
        self.client.connect("127.0.0.1", self._port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError("subscriber: no SUBACK within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_count(self, topic: str, count: int, timeout: float = 15.0) -> list[Received]:
        """At least ``count`` messages on ``topic`` (AssertionError naming what came if not)."""
        if not wait_for(lambda: len(self.on(topic)) >= count, timeout):
            raise AssertionError(f"{len(self.on(topic))} message(s) on {topic}, expected "
                                 f"{count}: {self.on(topic)[:5]}")
        return self.on(topic)
