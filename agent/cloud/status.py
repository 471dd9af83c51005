"""``car-agent status VEHICLE_ID``: the owner's answer for one vehicle, no service needed.

One short MQTT connection as the cloud identity:

1. subscribe to the vehicle's ``state`` and ``status`` (their retained messages come right
   after the SUBACK), then to a response topic of our own; once that second SUBACK is in, the
   retained messages have been delivered (a short grace covers brokers that send them later);
2. verify the retained state exactly as ``watch`` does (JWK Set, CRL, vid: ``checker_for``);
3. if there is no verified state, or it is older than ``max_age`` seconds, and the car is not
   known to be offline, ask it for a snapshot (:mod:`agent.cloud.snapshot`) and wait at most
   ``REFRESH_WAIT_S`` for the verified answer;
4. build the view from verified records only and say the answer (:mod:`agent.cloud.answer`).

Nothing verified to say (no state, a bad signature, a revoked key, an unknown vehicle): one line
why, exit 3. An old state the car did not refresh is still answered (the answer says its age),
with a note on stderr.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud.answer import LANGS, answer
from agent.cloud.checks import MessageChecker, checker_for
from agent.cloud.config import CloudConfig, load_cloud_config, make_ssl_context
from agent.cloud.snapshot import (PendingSnapshots, correlation_of, make_request, new_requester,
                                  publish_request, response_topic)
from agent.cloud.view import VehicleView, merge
from agent.config import VEHICLE_ID_PATTERN
from agent.errors import UserError
from agent.uplink.tlsdiag import describe_connect_error

DEFAULT_MAX_AGE_S = 300.0
REFRESH_WAIT_S = 5.0
CONNECT_WAIT_S = 10.0
#: After our last SUBACK, how long to wait for a retained state a broker may send late.
RETAINED_GRACE_S = 1.0


class NothingVerified(UserError):
    """Nothing verified can be said about the vehicle."""

    exit_code = 3


class NoBroker(UserError):
    """The broker could not be reached or refused us."""

    exit_code = 1


class StatusClient:
    """One vehicle's retained state and status, and a snapshot request, over one connection."""

    def __init__(self, config: CloudConfig, vid: str, checker: MessageChecker) -> None:
        self.config = config
        self.vid = vid
        self.checker = checker
        prefix = f"{config.topic_prefix}/{vid}"
        self.state_topic = f"{prefix}/state"
        self.status_topic = f"{prefix}/status"
        self.requester = new_requester()
        self.response_topic = response_topic(config.topic_prefix, vid, self.requester)
        self.state: dict[str, Any] | None = None      # the retained state's record
        self.status: dict[str, Any] | None = None
        self.snapshot_rejections: list[str] = []
        self.pending = PendingSnapshots()
        self._cond = threading.Condition()
        self._connack: Any = None
        self._last_suback: int | None = None
        self._ready = False
        self._closed = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"cloud-status-{self.requester}", protocol=mqtt.MQTTv5)
        client.tls_set_context(make_ssl_context(config))
        client.connect_timeout = CONNECT_WAIT_S
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self.client = client

    # ------------------------------------------------------------------ control

    def open(self) -> None:
        """Connect and subscribe; return once the retained messages are in.

        :raises NoBroker: no connection, or the broker refused it.
        """
        where = f"{self.config.host}:{self.config.port}"
        try:
            self.client.connect(self.config.host, self.config.port, keepalive=30)
        except Exception as exc:  # noqa: BLE001 - every failure is explained in one line
            raise NoBroker(describe_connect_error(exc, self.config.host, self.config.port)) \
                from None
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._closed, CONNECT_WAIT_S)
            if self._connack is not None and self._connack.is_failure:
                raise NoBroker(f"broker {where} refused the connection: {self._connack}")
            if not self._ready:
                raise NoBroker(f"no subscription at {where} within {CONNECT_WAIT_S:g} s")
            self._cond.wait_for(lambda: self.state is not None, RETAINED_GRACE_S)

    def refresh(self, timeout: float = REFRESH_WAIT_S) -> dict[str, Any] | None:
        """Ask the vehicle for a snapshot; its verified record, or None after ``timeout`` s."""
        request = make_request(self.config.topic_prefix, self.vid, self.requester)
        self.pending.expect(request)
        publish_request(self.client, request)
        return self.pending.wait(request, timeout)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> "StatusClient":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        with self._cond:
            self._connack = reason
            if reason.is_failure:
                self._closed = True
                self._cond.notify_all()
                return
        client.subscribe([(self.state_topic, 1), (self.status_topic, 1)])
        _, mid = client.subscribe(self.response_topic, 1)
        with self._cond:
            self._last_suback = mid

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            if mid == self._last_suback:
                self._ready = True
                self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        record = self.checker.check(topic, message.payload, bool(message.retain))
        if topic == self.response_topic:
            if not self.pending.deliver(topic, correlation_of(message), record) \
                    and "rejected" in record:
                self.snapshot_rejections.append(record["rejected"])
            return
        with self._cond:
            if topic == self.state_topic:
                # The newest verified state wins; a rejection only fills an empty slot.
                if record.get("verified") or self.state is None:
                    self.state = record
            elif topic == self.status_topic:
                self.status = record
            self._cond.notify_all()


def build_view(vid: str, *records: dict[str, Any] | None) -> VehicleView:
    view = VehicleView(vid=vid)
    for record in records:
        if record is not None:
            view = merge(view, record)      # merge leaves rejected records out itself
    return view


def ask(config: CloudConfig, vid: str, max_age: float, *, now=time.time,
        on_note=lambda text: None) -> VehicleView:
    """The verified view of ``vid``: its retained state, refreshed if older than ``max_age``.

    :raises NothingVerified: no verified state and no verified snapshot (one line why).
    :raises NoBroker: the broker cannot be reached.
    """
    problems: list[str] = []
    checker = checker_for(config, on_problem=problems.append)
    with StatusClient(config, vid, checker) as client:
        view = build_view(vid, client.status, client.state)
        offline = view.online is False
        stale = view.as_of is None or now() - view.as_of > max_age
        snapshot = None
        if stale and not offline:
            snapshot = client.refresh()
            view = build_view(vid, client.status, client.state, snapshot)
    state = client.state
    if view.source is None:
        if state is None:
            why = f"nothing retained on {client.state_topic} (unknown vehicle, or it never " \
                  "published)"
        else:
            why = f"the retained state on {client.state_topic} was rejected: {state['rejected']}"
        if offline:
            why += f"; {vid} is offline"
        elif client.snapshot_rejections:
            why += f"; its snapshot was rejected: {client.snapshot_rejections[0]}"
        else:
            why += f"; no answer to a snapshot request within {REFRESH_WAIT_S:g} s"
        if problems:
            why += f" ({problems[0]})"
        raise NothingVerified(f"no verified state for {vid}: {why}")
    if stale and snapshot is None:
        age = int(now() - view.as_of)
        reason = f"{vid} is offline" if offline else \
            f"no snapshot from {vid} within {REFRESH_WAIT_S:g} s"
        on_note(f"the state is {age} s old and {reason}; answering from it")
    return view


def status_main(config_path: str | Path, vid: str, *, json_out: bool = False, lang: str = "en",
                max_age: float = DEFAULT_MAX_AGE_S, out: TextIO | None = None,
                err: TextIO | None = None) -> int:
    """``car-agent status``: print the answer (text, or the JSON with ``json_out``); 0.

    :raises UserError: bad arguments or config (exit 2), no broker (1), nothing verified (3).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not VEHICLE_ID_PATTERN.fullmatch(vid):
        raise UserError(f"{vid[:70]!r} is not a valid vehicle id (1-64 of A-Z a-z 0-9 . _ -, "
                        "starting with a letter or digit)")
    if lang not in LANGS:
        raise UserError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
    if not max_age >= 0:
        raise UserError(f"--max-age must be 0 or more seconds, got {max_age}")
    config = load_cloud_config(config_path)
    view = ask(config, vid, max_age,
               on_note=lambda text: print(f"car-agent status: {text}", file=err))
    result = answer(view, lang)
    line = json.dumps(result, ensure_ascii=False) if json_out else result["text"]
    try:
        out.write(line + "\n")
    except UnicodeEncodeError:      # a terminal that cannot show Chinese: escaped, not a crash
        out.write(line.encode("ascii", "backslashreplace").decode("ascii") + "\n")
    out.flush()
    return 0
