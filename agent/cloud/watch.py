"""Watch what vehicles publish and verify it (``car-agent watch``).

A watcher connects to the broker over mutual TLS as the ``cloud`` client, subscribes to
``<prefix>/+/#`` and turns every message into one plain record
(:class:`agent.cloud.checks.MessageChecker`), printed one per line.

Nothing a vehicle (or anyone else) sends can crash the watcher: every message becomes a
record. Connection problems are reported as one line each and retried with backoff.
Config: :mod:`agent.cloud.config`; revocation: :mod:`agent.cloud.revocation`.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import signal
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.cloud.checks import SeqTracker, _rejected, checker_for, ts_text
from agent.cloud.config import CloudConfig, load_cloud_config, make_ssl_context
from agent.errors import KeyFileError, UserError
from agent.uplink.tlsdiag import (
    _short,
    describe_connect_error,
    describe_tls_alert,
    probe_tls12,
)

log = logging.getLogger("car_agent.cloud")

#: How long the broker keeps our subscription across a short outage of this watcher.
SESSION_EXPIRY_S = 300


# --------------------------------------------------------------------------- connection errors

# --------------------------------------------------------------------------- the watcher


class CloudWatcher:
    """Subscribes to every vehicle's topics and hands each checked message to ``on_message``.

    Runs paho's network loop in its own thread (:meth:`start`, :meth:`stop`); callbacks are
    called from that thread. ``connected`` is set while connected *and subscribed*, so a
    test can publish once it is set. Connection problems go to ``on_problem`` (one line
    each; a problem identical to the previous one is not repeated), successful
    (re)connections to ``on_connect``.
    """

    def __init__(
        self,
        config: CloudConfig,
        on_message: Callable[[dict[str, Any]], None],
        *,
        on_problem: Callable[[str], None] | None = None,
        on_connect: Callable[[str], None] | None = None,
        client_id: str | None = None,
        tracker: SeqTracker | None = None,
        topic_filter: str | None = None,
    ) -> None:
        self.config = config
        self.on_message = on_message
        self.on_problem = on_problem or (lambda text: log.warning("%s", text))
        self.on_connect = on_connect or (lambda text: log.info("%s", text))
        self.client_id = client_id or f"cloud-watch-{secrets.token_hex(6)}"
        self.checker = checker_for(config, tracker, on_problem=self._crl_problem)
        self.ssl_context = make_ssl_context(config)
        self.topic_filter = topic_filter or f"{config.topic_prefix}/+/#"
        self.connected = threading.Event()
        self.ever_connected = threading.Event()
        self.last_problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        # Per connection attempt, touched only by the network thread:
        self._log_errors: list[str] = []
        self._connack: str | None = None  # None: none yet; "" success; else refusal reason
        self._disconnect_reason: str | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> "CloudWatcher":
        if self._thread is not None:
            raise RuntimeError("CloudWatcher already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cloud-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly and end the network thread. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def client_if_connected(self) -> mqtt.Client | None:
        """The paho client while connected and subscribed (to publish with; paho's publish is
        thread-safe), else None."""
        client = self._client
        return client if client is not None and self.connected.is_set() else None

    def __enter__(self) -> "CloudWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ network thread

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(self.ssl_context)
        client.connect_timeout = 5.0
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(self.config.host, self.config.port, self.config.keepalive_s,
                             clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
        return client

    def _run(self) -> None:
        try:
            client = self._client = self._new_client()
            try:
                self._session(client)
            finally:
                self._close(client)
        except Exception as exc:  # noqa: BLE001 - report, never die silently
            log.exception("cloud watcher failed")
            self._problem(f"watcher stopped: {type(exc).__name__}: {_short(exc)}")
        finally:
            self.connected.clear()

    def _session(self, client: mqtt.Client) -> None:
        cfg = self.config
        delay = cfg.reconnect_min_s
        while not self._stop.is_set():
            self._log_errors.clear()
            self._connack = None
            self._disconnect_reason = None
            try:
                client.reconnect()
            except (OSError, ssl.CertificateError, ValueError) as exc:
                self._problem(describe_connect_error(exc, cfg.host, cfg.port))
            else:
                while not self._stop.is_set():
                    rc = client.loop(0.1)
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                if self._stop.is_set():
                    return
                self._problem(self._diagnose())
                if self._connack == "":
                    delay = cfg.reconnect_min_s  # was connected: retry soon
            # Backoff with jitter; a stop request ends the wait at once.
            self._stop.wait(random.uniform(delay / 2, delay))
            delay = min(cfg.reconnect_max_s, delay * 2)

    def _diagnose(self) -> str:
        """One line for why the last connection ended."""
        where = f"{self.config.host}:{self.config.port}"
        errors = " | ".join(e for e in self._log_errors if not e.startswith("Client is not connected"))
        if self._connack:
            return f"broker {where} refused the connection: {self._connack}"
        alert = describe_tls_alert(errors)
        if alert:
            return alert
        detail = f" ({errors})" if errors else ""
        if self._connack is None:
            # With TLS 1.3 the broker checks our certificate after the handshake; its alert
            # is often lost because it closes the socket while our CONNECT is under way.
            # A handshake capped at TLS 1.2 makes the broker say why, during the handshake.
            probed = self._probe_tls12()
            if probed:
                return probed
            return f"connection to {where} closed before the broker accepted it{detail}"
        reason = self._disconnect_reason or "connection lost"
        return f"connection to {where} lost: {reason}{detail}; reconnecting"

    def _probe_tls12(self) -> str | None:
        try:
            return probe_tls12(make_ssl_context(self.config), self.config.host, self.config.port)
        except KeyFileError:
            return None

    def _close(self, client: mqtt.Client) -> None:
        if client.is_connected():
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0  # we are leaving for good: drop our session
            client.disconnect(properties=props)
            deadline = time.monotonic() + 2.0
            while client.is_connected() and time.monotonic() < deadline:
                if client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        reset = getattr(client, "_reset_sockets", None)  # close the socket pair loop() made
        if callable(reset):
            reset()

    def _crl_problem(self, text: str) -> None:
        # Not through _problem(): a CRL problem is no connection problem (last_problem).
        try:
            self.on_problem(text)
        except Exception:  # noqa: BLE001
            log.exception("on_problem callback failed")

    def _problem(self, text: str) -> None:
        if text != self.last_problem:
            self.last_problem = text
            try:
                self.on_problem(text)
            except Exception:  # noqa: BLE001
                log.exception("on_problem callback failed")

    # ------------------------------------------------------------------ paho callbacks

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and len(self._log_errors) < 10:
            self._log_errors.append(text)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._connack = str(reason)
            return
        self._connack = ""
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe(self.topic_filter, options=options)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list,
                      properties: Any) -> None:
        failures = [str(code) for code in reason_codes if code.is_failure]
        if failures:
            self._problem(f"broker refused the subscription to {self.topic_filter}: "
                          f"{', '.join(failures)}")
            return
        self.last_problem = None
        self.connected.set()
        self.ever_connected.set()
        try:
            self.on_connect(f"connected to {self.config.host}:{self.config.port}, "
                            f"subscribed to {self.topic_filter}")
        except Exception:  # noqa: BLE001
            log.exception("on_connect callback failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected.clear()
        self._disconnect_reason = str(reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            record = _rejected(repr(bytes(msg._topic))[2:-1], "topic is not UTF-8")
        else:
            record = self.checker.check(topic, msg.payload, bool(msg.retain))
        try:
            self.on_message(record)
        except Exception:  # noqa: BLE001 - a broken consumer must not kill the network loop
            log.exception("on_message callback failed")


# --------------------------------------------------------------------------- output


def _printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a terminal: control characters escaped, length capped."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return json.dumps(value)


def format_human(record: dict[str, Any]) -> str:
    """One readable line for a record (rejections start with ``rejected``)."""
    if not record.get("verified"):
        if "rejected" in record:
            seq = f" (seq {record['seq']})" if "seq" in record else ""
            return _printable(f"rejected {record['topic']}: {record['rejected']}{seq}", 400)
        if record.get("kind") == "metrics":
            m = record["metrics"]
            source = m.get("source") if isinstance(m.get("source"), dict) else {}
            outbox = m.get("outbox") if isinstance(m.get("outbox"), dict) else {}
            return _printable(f"{record['vid']} metrics {m.get('frames_per_s')} frames/s, bus "
                              f"{source.get('state', '?')}, {outbox.get('queued', '?')} queued",
                              300)
        retained = " (retained)" if record.get("retained") else ""
        return f"{record['vid']} status {_printable(str(record['status']), 100)}{retained}"
    quality = record.get("quality") or {}
    shown = [f"{path}={_value_text(value) if path not in quality else quality[path]}"
             for path, value in record["signals"].items()]
    parts = [
        f"{record['vid']} {record['kind']} seq={record['seq']} boot={record['boot']} "
        f"{ts_text(record['ts'])}",
    ]
    parts.append(" ".join(shown) if shown else "(no signals)")
    if record.get("retained"):
        parts.append("(retained)")
    if record.get("superseded"):
        parts.append("(from an older stream)")
    return _printable("  ".join(parts), 4000)


def watch_main(
    config_path: str | Path,
    json_lines: bool = False,
    count: int | None = None,
    duration: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``car-agent watch``: print every message vehicles publish, verified.

    Verified messages and status go to ``out`` (JSON lines with ``json_lines``); in human
    mode rejections go to ``err``. Connection problems are one line each on ``err``.
    Ends after ``count`` verified messages, after ``duration`` seconds, or on
    SIGINT/SIGTERM. Returns 0, or 1 if no connection was ever made.

    :raises UserError: bad config, key set or certificate files (one line).
    """
    if count is not None and count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if duration is not None and not duration > 0:
        raise UserError(f"--duration must be a positive number of seconds, got {duration}")
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    config = load_cloud_config(config_path)
    done = threading.Event()
    lock = threading.Lock()
    verified = 0

    def emit(stream: TextIO, line: str) -> None:
        with lock:
            if done.is_set() and stream is out:
                return
            try:
                try:
                    stream.write(line + "\n")
                except UnicodeEncodeError:  # e.g. an ASCII-only terminal
                    stream.write(line.encode("ascii", "backslashreplace").decode("ascii") + "\n")
                stream.flush()
            except (BrokenPipeError, ValueError):  # reader went away / stream closed
                done.set()

    def on_message(record: dict[str, Any]) -> None:
        nonlocal verified
        if done.is_set():
            return
        if json_lines:
            emit(out, json.dumps(record, separators=(",", ":")))
        elif "rejected" in record:
            emit(err, format_human(record))
        else:
            emit(out, format_human(record))
        if record.get("verified"):
            with lock:
                verified += 1
                if count is not None and verified >= count:
                    done.set()

    watcher = CloudWatcher(
        config,
        on_message,
        on_problem=lambda text: emit(err, f"car-agent watch: {text}"),
        on_connect=lambda text: emit(err, f"car-agent watch: {text}"),
    )

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: done.set())
    try:
        watcher.start()
        deadline = None if duration is None else time.monotonic() + duration
        while not done.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            # Short waits so signals are handled promptly on every platform.
            done.wait(0.2 if remaining is None else min(0.2, remaining))
    finally:
        watcher.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not watcher.ever_connected.is_set():
        if watcher.last_problem is None:
            emit(err, f"car-agent watch: no connection to {config.host}:{config.port}"
                      + (f" within {duration:g} s" if duration is not None else ""))
        return 1
    return 0
