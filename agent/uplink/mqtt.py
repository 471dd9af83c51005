"""The outbox drained to MQTT 5 over mutually authenticated TLS (paho-mqtt 2.x).

One thread owns the paho client: it connects (exponential backoff with jitter), runs paho's
network loop, and keeps up to ``max_inflight`` outbox entries published. An entry leaves the
outbox only when the broker's PUBACK reports success; a failure reason code (e.g. 0x87 Not
authorized) is logged, counted, and the entry kept and retried later. paho re-sends what was in
flight after a reconnect, so the mid -> seq map survives reconnects.

Connection failures are explained in one line, including the TLS 1.3 case where the broker
rejects our certificate only after the handshake (visible only in paho's log callback).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509

from agent.config import MqttConfig
from agent.errors import KeyFileError
from agent.uplink.keyfiles import FileWatcher, check_private_key_file
from agent.uplink.outbox import Outbox
from agent.uplink.tlsdiag import ClosingSSLSocket, describe_connect_error, describe_tls_alert, probe_tls12

log = logging.getLogger("car_agent.uplink")

#: A refused entry (PUBACK failure) is retried after this long, not in a hot loop.
FAILED_RETRY_S = 30.0
#: How often the CA, certificate and key files are checked for changes (rotation).
CREDENTIALS_CHECK_S = 5.0
CONNECT_TIMEOUT_S = 10.0

def build_tls_context(config: MqttConfig) -> ssl.SSLContext:
    """Client TLS: verify the broker (CA + host name, always), present our certificate."""
    for name in ("ca", "cert", "key"):
        path: Path = getattr(config, name)
        if not path.is_file():
            raise KeyFileError(f"{path}: mqtt.{name} file not found")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # check_hostname + CERT_REQUIRED
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if config.tls_version == "1.3"
                               else ssl.TLSVersion.TLSv1_2)
    context.sslsocket_class = ClosingSSLSocket   # paho leaks the socket of a failed handshake
    try:
        context.load_verify_locations(cafile=str(config.ca))
    except (ssl.SSLError, OSError) as exc:
        raise KeyFileError(f"{config.ca}: mqtt.ca is not a usable CA certificate file: "
                           f"{getattr(exc, 'reason', None) or exc}") from None
    try:
        context.load_cert_chain(certfile=str(config.cert), keyfile=str(config.key))
    except (ssl.SSLError, OSError) as exc:
        raise KeyFileError(f"{config.cert}: mqtt.cert/mqtt.key unusable (not PEM, or the key "
                           f"does not match the certificate): "
                           f"{getattr(exc, 'reason', None) or exc}") from None
    return context


def certificate_expiry(path: Path) -> dt.datetime | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc


@dataclass
class UplinkCounters:
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    connects: int = 0
    connect_failures: int = 0
    refused_codes: dict[str, int] = field(default_factory=dict)


class Uplink:
    def __init__(self, config: MqttConfig, vehicle_id: str, outbox: Outbox) -> None:
        self.config = config
        self.vehicle_id = vehicle_id
        self.outbox = outbox
        prefix = f"{config.topic_prefix}/{vehicle_id}"
        self.topics = {"events": f"{prefix}/events", "state": f"{prefix}/state",
                       "status": f"{prefix}/status", "metrics": f"{prefix}/metrics"}
        self.counters = UplinkCounters()
        self.connected = threading.Event()
        self.last_error: str | None = None
        self._tls_hint: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._inflight: dict[int, int] = {}         # paho mid -> outbox seq
        self._retry_at: dict[int, float] = {}       # seq -> monotonic time it may be retried
        self._status_mid: int | None = None
        self._status_acked = threading.Event()
        self._metrics: bytes | None = None
        self._thread: threading.Thread | None = None
        self._context = build_tls_context(config)
        self.client = self._make_client()
        self._credentials = FileWatcher([config.ca, config.cert, config.key])
        self.rotations = 0

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=self.config.client_id or self.vehicle_id,
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(self._context)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(self.config.max_inflight)
        client.will_set(self.topics["status"], b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return client

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A new outbox entry: the uplink thread publishes it now, not when its wait for the
        socket (client.loop, up to 50 ms) times out. paho's loop also waits on the socket
        pair through which paho itself wakes it; one byte there ends the wait (paho reads and
        drops it). Without that pair (another paho) the entry waits for the timeout."""
        self._wake.set()
        pair = getattr(self.client, "_sockpairW", None)
        if pair is not None:
            try:
                pair.send(b"\0")
            except OSError:        # full (already woken) or closed (reconnecting): no matter
                pass

    def publish_metrics(self, payload: bytes) -> None:
        """Health metrics (unsigned JSON, QoS 0, not queued): the newest replaces an unsent one."""
        self._metrics = payload
        self._wake.set()

    def wait_drained(self, timeout: float) -> bool:
        """Until the outbox is empty (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.outbox) == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return len(self.outbox) == 0

    def stop(self, offline_timeout: float = 3.0) -> None:
        """Publish ``offline`` (retained) if connected, disconnect cleanly, end the thread."""
        if self._thread is None:
            return
        if self.connected.is_set():
            self._status_acked.clear()
            self._want_offline = True
            self._wake.set()
            self._status_acked.wait(offline_timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._thread = None

    # -- the network thread -----------------------------------------------------------------
    _want_offline = False
    _connack_seen = False

    def _run(self) -> None:
        delay = self.config.reconnect_min_s
        client = self.client
        first = True
        next_credentials_check = time.monotonic() + CREDENTIALS_CHECK_S
        while not self._stop.is_set():
            if time.monotonic() >= next_credentials_check:
                next_credentials_check = time.monotonic() + CREDENTIALS_CHECK_S
                if self._credentials.changed() and self._rotate():
                    client = self.client
                    first = True
            if not self._socket_open(client):
                if not first:
                    pause = random.uniform(delay / 2, delay)   # jitter: no thundering herd
                    self._stop.wait(pause)
                    delay = min(delay * 2, self.config.reconnect_max_s)
                    if self._stop.is_set():
                        break
                first = False
                if not self._connect(client):
                    continue
            rc = client.loop(timeout=0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                continue
            if self.connected.is_set():
                delay = self.config.reconnect_min_s
                if self._want_offline:
                    self._publish_offline(client)
                if self._metrics is not None:
                    payload, self._metrics = self._metrics, None
                    client.publish(self.topics["metrics"], payload, qos=0)
                self._pump(client)
            if self._wake.is_set():
                self._wake.clear()
        try:
            client.disconnect()
            client.loop(timeout=0.2)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def _rotate(self) -> bool:
        """New CA/certificate/key on disk: reconnect with them, keeping the outbox as it is.

        Unusable new files (half written, wrong mode, key not matching) keep the current
        connection; the next change is tried again.
        """
        try:
            check_private_key_file(self.config.key, "mqtt.key")
            context = build_tls_context(self.config)
        except KeyFileError as exc:
            log.warning("uplink: credentials changed on disk but are not usable (%s); keeping "
                        "the current ones", exc)
            return False
        log.info("uplink: credentials changed on disk; reconnecting with them")
        old = self.client
        try:
            old.disconnect()
            old.loop(timeout=0.1)
        except Exception:  # noqa: BLE001 - the old connection may already be gone
            pass
        self.connected.clear()
        self._context = context
        # paho keeps unacknowledged messages per client; the new client starts empty and the
        # outbox (which still holds them) republishes: the cloud de-duplicates by seq.
        self._inflight.clear()
        self.client = self._make_client()
        self.rotations += 1
        return True

    @staticmethod
    def _socket_open(client: mqtt.Client) -> bool:
        return client.socket() is not None

    def _connect(self, client: mqtt.Client) -> bool:
        self._tls_hint = None
        self._connack_seen = False
        try:
            client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s,
                           clean_start=True)
            return True
        except Exception as exc:  # noqa: BLE001 - every failure is explained, none is fatal
            self._failed(describe_connect_error(exc, self.config.host, self.config.port))
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001
                pass
            return False

    def _failed(self, reason: str) -> None:
        self.counters.connect_failures += 1
        expiry = certificate_expiry(self.config.cert)
        if expiry is not None and expiry < dt.datetime.now(dt.timezone.utc):
            reason += f" (note: our client certificate {self.config.cert} expired {expiry:%Y-%m-%d})"
        if reason != self.last_error:
            log.error("uplink: cannot connect: %s", reason)
        self.last_error = reason

    def _pump(self, client: mqtt.Client) -> None:
        room = self.config.max_inflight - len(self._inflight)
        if room <= 0:
            return
        now = time.monotonic()
        blocked = set(self._inflight.values())
        if self._retry_at:
            for seq, at in list(self._retry_at.items()):
                if at > now:
                    blocked.add(seq)
                else:
                    del self._retry_at[seq]
        for entry in self.outbox.pending(room, exclude=blocked):
            info = client.publish(entry.topic, entry.payload, qos=1, retain=entry.retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                break
            self._inflight[info.mid] = entry.seq
            self.counters.published += 1

    def _publish_offline(self, client: mqtt.Client) -> None:
        self._want_offline = False
        info = client.publish(self.topics["status"], b"offline", qos=1, retain=True)
        self._status_mid = info.mid

    # -- paho callbacks (run in this thread, inside client.loop) ----------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack_seen = True
        if reason_code.is_failure:
            self._failed(f"broker {self.config.host}:{self.config.port} refused the connection: "
                         f"{reason_code}")
            return
        self.counters.connects += 1
        if self.last_error:
            log.info("uplink: connected to %s:%s after: %s", self.config.host,
                     self.config.port, self.last_error)
        else:
            log.info("uplink: connected to %s:%s", self.config.host, self.config.port)
        self.last_error = None
        self.connected.set()
        client.publish(self.topics["status"], b"online", qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if self._stop.is_set():
            return
        hint = self._tls_hint
        if hint is None and not self._connack_seen:
            # Closed before CONNACK without a TLS alert in the log (TLS 1.3 loses it often):
            # ask again with TLS 1.2, where the broker's alert is raised in the handshake.
            hint = probe_tls12(build_tls_context(self.config), self.config.host,
                               self.config.port) or (
                f"connection to {self.config.host}:{self.config.port} closed before the "
                "broker accepted it")
        if hint is not None:
            self._failed(hint)
        elif was:
            log.warning("uplink: connection lost (%s); %d message(s) queued", reason_code,
                        len(self.outbox))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if mid == self._status_mid:
            self._status_acked.set()
            return
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return   # the retained "online" status
        if reason_code.is_failure:
            name = str(reason_code)
            self.counters.refused += 1
            self.counters.refused_codes[name] = self.counters.refused_codes.get(name, 0) + 1
            self.outbox.record_failure(seq, f"PUBACK {reason_code.value:#04x} {name}")
            self._retry_at[seq] = time.monotonic() + FAILED_RETRY_S
            if self.counters.refused_codes[name] in (1, 10, 100, 1000):
                log.error("uplink: broker refused seq %d: %s (%#04x); kept in the outbox "
                          "(%d refusal(s) so far)", seq, name, reason_code.value,
                          self.counters.refused)
            return
        self.outbox.delete(seq)
        self.counters.acknowledged += 1

    def _on_log(self, client, userdata, level, text) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            hint = describe_tls_alert(text)
            if hint is not None:
                self._tls_hint = hint

    # -- reporting --------------------------------------------------------------------------
    def status_line(self) -> str:
        state = "connected" if self.connected.is_set() else "disconnected"
        return (f"{state}, {len(self.outbox)} queued, {len(self._inflight)} in flight, "
                f"{self.counters.acknowledged} delivered, {self.counters.refused} refused")
