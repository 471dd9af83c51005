"""Ask a vehicle for a fresh snapshot: the cloud side of :mod:`agent.uplink.requests`.

A request is an MQTT 5 PUBLISH to ``{prefix}/{vid}/cmd/snapshot`` (QoS 1, empty payload) with a
Response Topic ``{prefix}/{vid}/snapshot/{requester}`` and 16 random bytes of Correlation Data.
The car answers on the response topic with a signed ``kind: "snapshot"`` message echoing the
correlation data; :class:`agent.cloud.checks.MessageChecker` verifies it like a state.

The caller owns the paho client (``status``: a short-lived one; ``serve``: a long-lived one):

1. subscribe to the response topic (or to ``{prefix}/+/snapshot/{requester}`` once), *before*
   publishing, so the answer cannot be missed. A ``$share/...`` subscription is not enough: the
   broker may hand the answer to another instance of the group;
2. ``pending.expect(request)``, then :func:`publish_request`;
3. in ``on_message``, check the message with the MessageChecker and hand the record to
   ``pending.deliver(topic, correlation_data, record)``;
4. ``pending.wait(request, timeout)``: the verified snapshot record, or None (bounded).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import VEHICLE_ID_PATTERN
from agent.uplink.requests import REQUESTER_PATTERN, request_topic

CORRELATION_BYTES = 16

__all__ = ["PendingSnapshots", "SnapshotRequest", "make_request", "new_requester",
           "publish_request", "request_topic", "response_topic"]


def new_requester() -> str:
    """A random requester id (one per process or per request)."""
    return secrets.token_hex(8)


def response_topic(topic_prefix: str, vid: str, requester: str) -> str:
    if not REQUESTER_PATTERN.fullmatch(requester):
        raise ValueError(f"requester id {requester[:70]!r} is not 1-64 of A-Z a-z 0-9 _ -")
    return f"{topic_prefix}/{vid}/snapshot/{requester}"


def correlation_of(message: mqtt.MQTTMessage) -> bytes | None:
    """The Correlation Data of a received message, if any."""
    value = getattr(getattr(message, "properties", None), "CorrelationData", None)
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


@dataclass(frozen=True)
class SnapshotRequest:
    vid: str
    topic: str                  # {prefix}/{vid}/cmd/snapshot
    response_topic: str         # {prefix}/{vid}/snapshot/{requester}
    correlation: bytes          # random, echoed by the car
    sent_at: float              # wall time the request was made (s since the epoch)


def make_request(topic_prefix: str, vid: str, requester: str) -> SnapshotRequest:
    """A new request with fresh correlation data.

    :raises ValueError: ``vid`` or ``requester`` would not make a valid topic.
    """
    if not VEHICLE_ID_PATTERN.fullmatch(vid):
        raise ValueError(f"{vid[:70]!r} is not a valid vehicle id")
    return SnapshotRequest(vid=vid, topic=request_topic(topic_prefix, vid),
                           response_topic=response_topic(topic_prefix, vid, requester),
                           correlation=secrets.token_bytes(CORRELATION_BYTES),
                           sent_at=time.time())


def publish_request(client: mqtt.Client, request: SnapshotRequest) -> mqtt.MQTTMessageInfo:
    """Publish ``request`` (QoS 1) with its Response Topic and Correlation Data."""
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = request.response_topic
    properties.CorrelationData = request.correlation
    return client.publish(request.topic, b"", qos=1, properties=properties)


class PendingSnapshots:
    """Requests waiting for their answer, matched on response topic and correlation data.

    Thread-safe: :meth:`deliver` runs in paho's thread, :meth:`wait` in the caller's.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[tuple[str, bytes], dict[str, Any] | None] = {}

    def expect(self, request: SnapshotRequest) -> None:
        with self._cond:
            self._waiting[(request.response_topic, request.correlation)] = None

    def deliver(self, topic: str, correlation: bytes | None, record: dict[str, Any]) -> bool:
        """Offer a checked message; True if it answers a pending request (the first one wins).

        Only a verified ``snapshot`` record counts (the checker has matched its ``vid`` claim
        and signing key to the topic's vehicle).
        """
        if correlation is None or not record.get("verified") or record.get("kind") != "snapshot":
            return False
        key = (topic, correlation)
        with self._cond:
            if key not in self._waiting or self._waiting[key] is not None:
                return False
            self._waiting[key] = record
            self._cond.notify_all()
        return True

    def wait(self, request: SnapshotRequest, timeout: float) -> dict[str, Any] | None:
        """The verified snapshot answering ``request``, or None after ``timeout`` seconds.

        The request is forgotten either way.
        """
        key = (request.response_topic, request.correlation)
        with self._cond:
            self._cond.wait_for(lambda: self._waiting.get(key) is not None, timeout)
            return self._waiting.pop(key, None)

    def forget(self, request: SnapshotRequest) -> None:
        with self._cond:
            self._waiting.pop((request.response_topic, request.correlation), None)
