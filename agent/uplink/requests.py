"""Snapshot requests from the cloud: checked where they arrive, answered by the daemon's loop.

The agent subscribes to exactly one topic, ``{prefix}/{vid}/cmd/snapshot`` (QoS 1); a snapshot
is the only command there is, and none will be added: the agent never actuates anything.

A request is an MQTT 5 PUBLISH with

* a Response Topic ``{prefix}/{vid}/snapshot`` or ``{prefix}/{vid}/snapshot/{requester}``
  (``requester``: 1-64 of ``A-Z a-z 0-9 _ -``). Anything else -- another vehicle's topic, the
  agent's own ``events``/``state``/``status``/``metrics`` (which carry other kinds of message)
  or its ``cmd/`` topics (a request answering itself) -- is a foreign response topic;
* optional Correlation Data, at most 64 bytes, echoed on the response;
* an empty payload or a JSON object (its content is ignored);
* at most 1 KiB of payload and properties together.

:meth:`SnapshotRequests.offer` runs in paho's network thread: it checks a request, applies the
rate limit (a token bucket: ``cmd.snapshot_rate`` per second, ``cmd.snapshot_burst`` at once)
and queues it; it never blocks and never raises. The daemon's loop polls :attr:`waiting` and
:meth:`take`s the requests, so answering (signing, the outbox) stays in one thread and the
decode loop is never held up by the network. Ignored requests are counted by reason.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

MAX_REQUEST_BYTES = 1024
MAX_CORRELATION_BYTES = 64
REQUESTER_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Reasons a request is ignored (keys of RequestCounters.ignored, in the metrics).
MALFORMED = "malformed"
OVERSIZED = "oversized"
FOREIGN_RESPONSE_TOPIC = "foreign_response_topic"
CORRELATION_TOO_LONG = "correlation_too_long"
RATE_LIMITED = "rate_limited"
QUEUE_FULL = "queue_full"
REASONS = (MALFORMED, OVERSIZED, FOREIGN_RESPONSE_TOPIC, CORRELATION_TOO_LONG, RATE_LIMITED,
           QUEUE_FULL)


def request_topic(topic_prefix: str, vehicle_id: str) -> str:
    return f"{topic_prefix}/{vehicle_id}/cmd/snapshot"


@dataclass(frozen=True)
class SnapshotRequest:
    """A checked request: where to answer, and what to echo."""

    response_topic: str
    correlation: bytes | None = None


@dataclass
class RequestCounters:
    received: int = 0
    accepted: int = 0
    answered: int = 0
    ignored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "accepted": self.accepted,
                "answered": self.answered, "ignored": dict(self.ignored)}


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _property_bytes(properties: Any) -> tuple[str | None, bytes | None, int, str | None]:
    """(response topic, correlation data, size of all properties, problem) of a PUBLISH."""
    if properties is None:
        return None, None, 0, None
    response = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    size = 0
    if response is not None:
        if not isinstance(response, str):
            return None, None, 0, "response topic is not text"
        size += len(response.encode("utf-8", "surrogatepass"))
    if correlation is not None:
        if not isinstance(correlation, (bytes, bytearray)):
            return None, None, 0, "correlation data is not bytes"
        correlation = bytes(correlation)
        size += len(correlation)
    for pair in getattr(properties, "UserProperty", None) or ():
        try:
            size += sum(len(str(part).encode("utf-8", "surrogatepass")) for part in pair)
        except TypeError:
            return None, None, 0, "user property is not a pair"
    content_type = getattr(properties, "ContentType", None)
    if isinstance(content_type, str):
        size += len(content_type.encode("utf-8", "surrogatepass"))
    return response, correlation, size, None


class SnapshotRequests:
    """The inbound side: check, rate-limit and queue requests; count what is ignored."""

    def __init__(self, topic_prefix: str, vehicle_id: str, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topic = request_topic(topic_prefix, vehicle_id)
        self._response_base = f"{topic_prefix}/{vehicle_id}/snapshot"
        self.bucket = TokenBucket(rate, burst, clock)
        self.counters = RequestCounters()
        self._queue: deque[SnapshotRequest] = deque()
        self._limit = burst     # the bucket lets no more than this through at once
        self._lock = threading.Lock()

    @property
    def waiting(self) -> bool:
        """Are requests queued? (Cheap: the daemon's loop asks every iteration.)"""
        return bool(self._queue)

    def take(self) -> list[SnapshotRequest]:
        """Every queued request, oldest first (the daemon's loop)."""
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
        return taken

    def answered(self, count: int = 1) -> None:
        self.counters.answered += count

    def offer(self, topic: Any, payload: Any, properties: Any) -> str | None:
        """Check one inbound message; queue it if it is a good request within the rate.

        Returns None when queued, else the reason it was ignored (counted). Never raises.
        """
        self.counters.received += 1
        try:
            reason = self._check(topic, payload, properties)
        except Exception:  # noqa: BLE001 - nothing a sender does may break the network thread
            reason = MALFORMED
        if reason is not None:
            self.counters.ignored[reason] += 1
        return reason

    def _check(self, topic: Any, payload: Any, properties: Any) -> str | None:
        if not isinstance(payload, (bytes, bytearray)):
            return MALFORMED
        response, correlation, size, problem = _property_bytes(properties)
        if len(payload) + size > MAX_REQUEST_BYTES:
            return OVERSIZED
        if problem is not None or topic != self.topic or response is None:
            return MALFORMED
        if not _payload_ok(bytes(payload)):
            return MALFORMED
        if not self._response_topic_ok(response):
            return FOREIGN_RESPONSE_TOPIC
        if correlation is not None and len(correlation) > MAX_CORRELATION_BYTES:
            return CORRELATION_TOO_LONG
        if not self.bucket.take():
            return RATE_LIMITED
        with self._lock:
            if len(self._queue) >= self._limit:
                return QUEUE_FULL
            self._queue.append(SnapshotRequest(response, correlation))
        self.counters.accepted += 1
        return None

    def _response_topic_ok(self, topic: str) -> bool:
        base = self._response_base
        if topic == base:
            return True
        return (topic.startswith(base) and topic[len(base):len(base) + 1] == "/"
                and REQUESTER_PATTERN.fullmatch(topic[len(base) + 1:]) is not None)


def _payload_ok(payload: bytes) -> bool:
    """Empty, or a JSON object (reserved; its content is ignored)."""
    if not payload.strip():
        return True
    try:
        return isinstance(json.loads(payload.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
