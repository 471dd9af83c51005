"""The outbox drained to MQTT 5 over mutually authenticated TLS (paho-mqtt 2.x).

One thread owns the paho client: it connects (exponential backoff with jitter), runs paho's
network loop, and keeps up to ``max_inflight`` outbox entries published. An entry leaves the
outbox only when the broker's PUBACK reports success; a failure reason code (e.g. 0x87 Not
authorized) is logged, counted, and the entry kept and retried later. paho re-sends what was in
flight after a reconnect, so the mid -> seq map survives reconnects.

Supervision: nothing that goes wrong in the thread ends it. A storage error on a PUBACK (disk
full while deleting the entry) keeps the entry and retries the delete; any other unexpected
exception is logged, the client is replaced (the outbox still holds what was in flight) and the
loop restarts after a pause. ``connected`` is cleared whenever the thread is not running its
loop, and :meth:`Uplink.alive` tells the daemon whether the thread is still there at all (if not,
the daemon stops feeding the watchdog and exits, so the service manager restarts the agent).

Connection failures are explained in one line, including the TLS 1.3 case where the broker
rejects our certificate only after the handshake (visible only in paho's log callback).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import CmdConfig, MqttConfig
from agent.errors import KeyFileError
from agent.uplink.keyfiles import FileWatcher, certificate_validity, check_private_key_file
from agent.uplink.outbox import Entry, Outbox
from agent.uplink.requests import SnapshotRequests
from agent.uplink.tlsdiag import ClosingSSLSocket, describe_connect_error, describe_tls_alert, probe_tls12

log = logging.getLogger("car_agent.uplink")

#: A refused entry (PUBACK failure) is retried after this long, not in a hot loop.
FAILED_RETRY_S = 30.0
#: How often the CA, certificate and key files are checked for changes (rotation).
CREDENTIALS_CHECK_S = 5.0
CONNECT_TIMEOUT_S = 10.0
#: A delivered entry whose delete failed (disk full) is deleted again at most this often.
DELETE_RETRY_S = 1.0
#: A stop waits this long for a network thread that is not connected.
STOP_JOIN_S = 1.0
#: After an unexpected error in the network thread, its loop restarts after this long.
RESTART_PAUSE_S = 1.0

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


def publish_packet_size(topic: str, payload: bytes, correlation: bytes | None = None) -> int:
    """Bytes of an MQTT 5 PUBLISH at QoS 1 (what Maximum Packet Size limits); its only
    property, on a snapshot response, is the Correlation Data (1-byte id, 2-byte length)."""
    properties = 0 if correlation is None else 3 + len(correlation)
    remaining = 2 + len(topic.encode("utf-8")) + 2 + 1 + properties + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else \
        3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


def certificate_expiry(path: Path) -> dt.datetime | None:
    try:
        return certificate_validity(path)[1]
    except (OSError, ValueError):
        return None


@dataclass
class UplinkCounters:
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    connects: int = 0
    connect_failures: int = 0
    store_errors: int = 0          # outbox errors on a PUBACK (the entry is kept, retried)
    oversize: int = 0              # entries larger than the broker accepts: dropped
    restarts: int = 0              # network loop restarted after an unexpected error
    refused_codes: dict[str, int] = field(default_factory=dict)


class Uplink:
    def __init__(self, config: MqttConfig, vehicle_id: str, outbox: Outbox,
                 cmd: CmdConfig | None = None) -> None:
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
        self._inflight: dict[int, int] = {}         # paho mid -> outbox seq
        self._retry_at: dict[int, float] = {}       # seq -> monotonic time it may be retried
        self._acked: set[int] = set()                # delivered, but the delete failed: retry
        self._next_delete_retry = 0.0
        self.max_packet = config.max_packet_bytes   # lowered by the broker's CONNACK
        self._status_mid: int | None = None
        self._status_acked = threading.Event()
        self._metrics: bytes | None = None
        self._thread: threading.Thread | None = None
        # Snapshot requests (the one subscription); None: cmd.enabled false, or no cmd config.
        self.requests: SnapshotRequests | None = None
        if cmd is not None and cmd.enabled:
            self.requests = SnapshotRequests(config.topic_prefix, vehicle_id, cmd.snapshot_rate,
                                             cmd.snapshot_burst)
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
        if self.requests is not None:
            self._listen_for_requests(client)
        return client

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="uplink", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """The network thread is running (always True before :meth:`start`)."""
        return self._thread is None or self._thread.is_alive()

    def is_connected(self) -> bool:
        """Connected, as claimed only by a living network thread."""
        return self.connected.is_set() and self.alive()

    def wake(self) -> None:
        """Wake the network thread now (a new outbox entry, metrics, stop), not when its wait
        for the socket (client.loop, up to 50 ms) times out. paho's loop also waits on the socket
        pair through which paho itself wakes it; one byte there ends the wait (paho reads and
        drops it). Without that pair (another paho) the entry waits for the timeout."""
        pair = getattr(self.client, "_sockpairW", None)
        if pair is not None:
            try:
                pair.send(b"\0")
            except OSError:        # full (already woken) or closed (reconnecting): no matter
                pass

    def publish_metrics(self, payload: bytes) -> None:
        """Health metrics (unsigned JSON, QoS 0, not queued): the newest replaces an unsent one."""
        self._metrics = payload
        self.wake()

    def wait_drained(self, timeout: float, *, while_connected: bool = False) -> bool:
        """Until the outbox is empty (True) or ``timeout`` seconds passed (False).

        ``while_connected``: give up as soon as the uplink is not connected (a stop must not
        wait for an outbox that cannot drain).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.outbox) == 0:
                return True
            if while_connected and not self.is_connected():
                return False
            self.wake()
            time.sleep(0.05)
        return len(self.outbox) == 0

    def stop(self, offline_timeout: float = 3.0) -> None:
        """Publish ``offline`` (retained) if connected, disconnect cleanly, end the thread.

        Not connected, the thread is given only :data:`STOP_JOIN_S`: it may be inside a
        blocking connect or TLS probe, and it is a daemon thread that ends with the process
        (what it has not sent stays in the outbox).
        """
        if self._thread is None:
            return
        connected = self.is_connected()
        if connected:
            self._status_acked.clear()
            self._want_offline = True
            self.wake()
            self._status_acked.wait(offline_timeout)
        self._stop.set()
        self.wake()
        self._thread.join(timeout=10 if connected else STOP_JOIN_S)
        self._thread = None

    # -- the network thread -----------------------------------------------------------------
    _want_offline = False
    _connack_seen = False

    def _supervise(self) -> None:
        """Run the network loop; restart it after any unexpected error instead of dying."""
        try:
            while True:
                try:
                    self._run()
                    return
                except Exception as exc:  # noqa: BLE001 - the uplink must outlive any bug
                    self.connected.clear()
                    if self._stop.is_set():
                        return   # stopping (the outbox may be closed under a late thread)
                    self.counters.restarts += 1
                    log.error("uplink: network thread failed (%s: %s); restarting it "
                              "(%d restart(s) so far)", type(exc).__name__, exc,
                              self.counters.restarts, exc_info=log.isEnabledFor(logging.DEBUG))
                    self._discard_client()
                    if self._stop.wait(RESTART_PAUSE_S):
                        return
        finally:
            self.connected.clear()

    def _discard_client(self) -> None:
        """Drop the paho client (and its in-flight state): the outbox still holds everything."""
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - the old client may be in any state
            pass
        try:
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        except Exception:  # noqa: BLE001
            pass
        self._inflight.clear()
        self.client = self._make_client()

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
                    if publish_packet_size(self.topics["metrics"], payload) <= self.max_packet:
                        client.publish(self.topics["metrics"], payload, qos=0)
                self._pump(client)
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
        if self._acked and time.monotonic() >= self._next_delete_retry:
            self._next_delete_retry = time.monotonic() + DELETE_RETRY_S
            self._retry_deletes()
        room = self.config.max_inflight - len(self._inflight)
        if room <= 0:
            return
        now = time.monotonic()
        blocked = set(self._inflight.values())
        blocked.update(self._acked)
        if self._retry_at:
            for seq, at in list(self._retry_at.items()):
                if at > now:
                    blocked.add(seq)
                else:
                    del self._retry_at[seq]
        for entry in self.outbox.pending(room, exclude=blocked):
            if publish_packet_size(entry.topic, entry.payload, entry.correlation) > self.max_packet:
                self._drop_oversize(entry)
                continue
            info = client.publish(entry.topic, entry.payload, qos=1, retain=entry.retain,
                                  properties=_response_properties(entry))
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                break
            self._inflight[info.mid] = entry.seq
            self.counters.published += 1

    def _drop_oversize(self, entry) -> None:
        """A broker closes the connection on a packet over its maximum, and paho resends it
        after the reconnect: sent, it would make the vehicle flap for ever. Drop and count."""
        self.counters.oversize += 1
        size = publish_packet_size(entry.topic, entry.payload, entry.correlation)
        try:
            self.outbox.drop_oversize(entry.seq)
        except sqlite3.Error as exc:
            self.counters.store_errors += 1
            self._retry_at[entry.seq] = time.monotonic() + FAILED_RETRY_S
            log.error("uplink: cannot drop oversize seq %d: %s", entry.seq, exc)
            return
        log.error("uplink: seq %d (%s, %d bytes as an MQTT packet) exceeds the maximum packet "
                  "size of %d bytes; dropped, never sent (%d so far)", entry.seq, entry.kind,
                  size, self.max_packet, self.counters.oversize)

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
        # The broker's CONNACK may announce a Maximum Packet Size: never send more.
        broker_max = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.max_packet = min(self.config.max_packet_bytes,
                              broker_max or self.config.max_packet_bytes)
        if self.last_error:
            log.info("uplink: connected to %s:%s after: %s", self.config.host,
                     self.config.port, self.last_error)
        else:
            log.info("uplink: connected to %s:%s", self.config.host, self.config.port)
        self.last_error = None
        self.connected.set()
        client.publish(self.topics["status"], b"online", qos=1, retain=True)
        if self.requests is not None:
            self._subscribe_requests(client)

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
            self._retry_at[seq] = time.monotonic() + FAILED_RETRY_S
            try:
                self.outbox.record_failure(seq, f"PUBACK {reason_code.value:#04x} {name}")
            except sqlite3.Error as exc:   # the count is lost, the entry kept and retried
                self.counters.store_errors += 1
                log.error("uplink: cannot record the refusal of seq %d in the outbox: %s",
                          seq, exc)
            if self.counters.refused_codes[name] in (1, 10, 100, 1000):
                log.error("uplink: broker refused seq %d: %s (%#04x); kept in the outbox "
                          "(%d refusal(s) so far)", seq, name, reason_code.value,
                          self.counters.refused)
            return
        self.counters.acknowledged += 1
        self._delete(seq)

    def _delete(self, seq: int) -> None:
        """Remove a delivered entry; on a storage error keep it and retry (never republish)."""
        try:
            self.outbox.delete(seq)
        except sqlite3.Error as exc:
            self.counters.store_errors += 1
            if self.counters.store_errors in (1, 10, 100, 1000):
                log.error("uplink: seq %d was delivered but cannot be removed from the outbox "
                          "(%s); kept and retried (%d storage error(s) so far)", seq, exc,
                          self.counters.store_errors)
            self._acked.add(seq)
            return
        self._acked.discard(seq)

    def _retry_deletes(self) -> None:
        for seq in sorted(self._acked):
            self._delete(seq)
            if seq in self._acked:
                return   # still failing: try again on the next pass

    # -- snapshot requests (agent.uplink.requests): the agent's only subscription --------------
    def _listen_for_requests(self, client: mqtt.Client) -> None:
        client.on_message = self._on_request
        client.on_subscribe = self._on_request_subscribed

    def _subscribe_requests(self, client: mqtt.Client) -> None:
        # no_local: a request can never come from ourselves.
        client.subscribe(self.requests.topic, options=SubscribeOptions(qos=1, noLocal=True))

    def _on_request(self, client, userdata, message) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = None
        # Checked and queued here (never raises), answered by the daemon's loop.
        self.requests.offer(topic, message.payload, getattr(message, "properties", None))

    def _on_request_subscribed(self, client, userdata, mid, reason_codes, properties) -> None:
        failures = [str(code) for code in reason_codes if code.is_failure]
        if failures:
            log.error("uplink: broker refused the subscription to %s: %s", self.requests.topic,
                      ", ".join(failures))

    def _on_log(self, client, userdata, level, text) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            hint = describe_tls_alert(text)
            if hint is not None:
                self._tls_hint = hint

    # -- reporting --------------------------------------------------------------------------
    def status_line(self) -> str:
        state = "connected" if self.is_connected() else (
            "disconnected" if self.alive() else "down (network thread ended)")
        return (f"{state}, {len(self.outbox)} queued, {len(self._inflight)} in flight, "
                f"{self.counters.acknowledged} delivered, {self.counters.refused} refused")


def _response_properties(entry: Entry) -> Properties | None:
    """A response to a snapshot request echoes the request's Correlation Data."""
    if entry.correlation is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)
    properties.CorrelationData = entry.correlation
    return properties
