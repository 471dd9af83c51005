"""``serve``'s Prometheus metrics, on a registry of its own (two services in one process, as
in the tests, do not share counters).

Rejection reasons become a small, fixed set of labels (:func:`reason_label`): the reason text
quotes seqs and ids, and a label per distinct text would grow without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServeMetrics", "reason_label", "CONTENT_TYPE_LATEST"]

# (label, substrings of the reason text that mean it), first match wins.
_REASONS = (
    ("bad_signature", ("bad signature",)),
    ("unknown_kid", ("unknown kid",)),
    ("duplicate", ("duplicate",)),
    ("revoked", ("revoked",)),
    ("certificate", ("certificate",)),
    ("wrong_vehicle", ("does not match the topic", "belongs to vehicle")),
    ("wrong_kind", ("does not match topic",)),
    ("bad_claims", ("bad claims",)),
    ("alg", ("unsupported alg", "alg mismatch")),
    ("too_large", ("too large",)),
    ("implausible_ts", ("implausible ts",)),
    ("topic", ("unexpected topic", "topic is not")),
    ("malformed", ("malformed", "empty payload")),
)


def reason_label(reason: str) -> str:
    for label, needles in _REASONS:
        if any(n in reason for n in needles):
            return label
    return "other"


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.verified = Counter("car_agent_messages_verified", "Signed messages verified, by kind",
                                ["kind"], registry=r)
        self.rejected = Counter("car_agent_messages_rejected", "Messages rejected, by reason",
                                ["reason"], registry=r)
        self.stored = Counter("car_agent_messages_stored", "Verified messages stored "
                              "(duplicate: delivered again, already stored)", ["result"],
                              registry=r)
        self.store_errors = Counter("car_agent_store_errors", "Store operations that failed",
                                    registry=r)
        self.store_seconds = Histogram("car_agent_store_seconds", "Store latency, by operation",
                                       ["op"], registry=r,
                                       buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1,
                                                .25, .5, 1, 2.5))
        self.requests = Counter("car_agent_http_requests", "HTTP requests, by status",
                                ["status"], registry=r)
        self.refreshes = Counter("car_agent_refresh", "Snapshot requests, by outcome",
                                 ["outcome"], registry=r)
        self.retained_read = Counter("car_agent_retained_read", "Retained messages read at start "
                                     "by the non-shared connection (share group only)",
                                     registry=r)
        self.connected = Gauge("car_agent_broker_connected", "1 while subscribed to the broker",
                               registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
