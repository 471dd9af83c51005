"""``serve``'s ingest: the vehicles' messages in, verified state into the store.

Every message is checked exactly as ``watch`` checks it (:class:`~agent.cloud.watch.CloudWatcher`
with its :class:`~agent.cloud.checks.MessageChecker`: JWKS, vid, replay, CRL). A rejected
message never reaches the store; it is counted by reason. A verified one is merged into the store
(idempotent); the unsigned status only sets online/offline.

With ``mqtt.share_group: NAME`` the subscription is ``$share/NAME/<prefix>/+/#``: the broker
splits the stream between the instances of the group. Shared subscriptions never deliver retained
messages, so each instance also reads the retained state once at start with a second,
non-shared connection that takes only retained messages and closes when they stop coming.

Refresh (:meth:`Ingest.refresh`): a snapshot request to the car (:mod:`agent.cloud.snapshot`;
response topic ``<prefix>/<vid>/snapshot/<instance name>``), then a wait until a verified message
of that vehicle is stored after it. In a share group the broker may hand the answer to another
instance: that one stores it in the shared database, which the waiting instance looks at a few
times a second, so no instance needs a subscription of its own.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable

from paho.mqtt.enums import MQTTErrorCode

from agent.cloud.config import CloudConfig
from agent.cloud.metrics import ServeMetrics, reason_label
from agent.cloud.snapshot import make_request, publish_request
from agent.cloud.store import Store
from agent.cloud.view import online_of
from agent.cloud.watch import CloudWatcher

log = logging.getLogger("car_agent.serve")

#: The retained read ends after this long without a retained message (after the SUBACK) ...
RETAINED_QUIET_S = 1.0
#: ... or after this long after the SUBACK in all.
RETAINED_MAX_S = 30.0


class Ingest:
    def __init__(self, config: CloudConfig, store: Store, metrics: ServeMetrics, *,
                 name: str | None = None,
                 on_problem: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.name = name or f"serve-{secrets.token_hex(4)}"
        self.on_problem = on_problem or (lambda text: log.warning("%s", text))
        self.ready = threading.Event()      # retained state read (or none to read)
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        prefix = config.topic_prefix
        shared = f"$share/{config.share_group}/{prefix}/+/#" if config.share_group else None
        self.watcher = CloudWatcher(config, self.handle, on_problem=self._problem,
                                    on_connect=self._connected, client_id=self.name,
                                    topic_filter=shared)
        self._retained: CloudWatcher | None = None
        self._last_retained = 0.0
        if shared:
            self._retained = CloudWatcher(config, self._handle_retained, on_problem=self._problem,
                                          on_connect=lambda text: None,
                                          client_id=f"{self.name}-retained")
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Ingest":
        self.watcher.start()
        if self._retained is None:
            self.ready.set()    # the non-shared subscription brings the retained state itself
        else:
            self._reader = threading.Thread(target=self._read_retained, name="serve-retained",
                                            daemon=True)
            self._reader.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._retained is not None:
            self._retained.stop()
        self.watcher.stop()
        self.metrics.connected.set(0)

    def _read_retained(self) -> None:
        reader = self._retained
        assert reader is not None
        reader.start()
        try:
            # However long the broker takes to be reachable: the retained state is the only
            # copy of a parked car's last state.
            while not reader.connected.wait(0.2):
                if self._stopping.is_set():
                    return
            started = self._last_retained = time.monotonic()
            while time.monotonic() - started < RETAINED_MAX_S:
                quiet = time.monotonic() - self._last_retained
                if quiet >= RETAINED_QUIET_S:
                    break
                time.sleep(RETAINED_QUIET_S - quiet)
        finally:
            reader.stop()
            self.ready.set()

    # ------------------------------------------------------------------ messages

    def _handle_retained(self, record: dict[str, Any]) -> None:
        if record.get("retained"):
            self._last_retained = time.monotonic()
            self.metrics.retained_read.inc()
            self.handle(record)

    def handle(self, record: dict[str, Any]) -> None:
        """One checked record (from either connection's network thread)."""
        rejected = record.get("rejected")
        if rejected is not None:
            self.metrics.rejected.labels(reason_label(rejected)).inc()
            return
        kind = record.get("kind")
        vid = record.get("vid")
        try:
            if kind == "status":
                online = online_of(record.get("status"))
                with self.metrics.store_seconds.labels("status").time():
                    self.store.set_online(vid, online)
            elif record.get("verified"):
                self.metrics.verified.labels(kind).inc()
                with self.metrics.store_seconds.labels("apply").time():
                    new = self.store.apply(record)
                self.metrics.stored.labels("new" if new else "duplicate").inc()
            else:
                return      # metrics: shown by watch, never state
        except Exception as exc:  # noqa: BLE001 - a store failure costs this message, not serve
            self.metrics.store_errors.inc()
            log.error("store: %s %s of %s not stored: %s: %s", kind, record.get("seq", ""), vid,
                      type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc) else "")
            return
        with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ refresh

    def refresh(self, vid: str, timeout: float = 5.0) -> bool:
        """Ask ``vid`` for a snapshot; True once a verified message of it is stored after the
        request (within ``timeout``), False if none came (or the request could not be sent)."""
        before = self.store.last_id(vid)
        if not self._request_snapshot(vid):
            self.metrics.refreshes.labels("not_sent").inc()
            return False
        deadline = time.monotonic() + timeout
        while True:
            if self.store.last_id(vid) > before:
                self.metrics.refreshes.labels("answered").inc()
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.metrics.refreshes.labels("timeout").inc()
                return False
            with self._changed:
                # Woken by this instance's ingest; a share group's other instance stores into
                # the same database, which the loop looks at again after at most 0.2 s.
                self._changed.wait(min(0.2, remaining))

    def _request_snapshot(self, vid: str) -> bool:
        client = self.watcher.client_if_connected()
        if client is None:
            return False
        info = publish_request(client, make_request(self.config.topic_prefix, vid, self.name))
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # ------------------------------------------------------------------ callbacks

    def _connected(self, text: str) -> None:
        self.metrics.connected.set(1)
        log.info("%s", text)

    def _problem(self, text: str) -> None:
        self.metrics.connected.set(1 if self.watcher.connected.is_set() else 0)
        self.on_problem(text)
