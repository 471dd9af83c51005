"""Message checks: one MQTT message in, one plain record dict out, never an exception.

* ``<prefix>/<vid>/events`` and ``<prefix>/<vid>/state``: a JWS token. It is verified against
  the vehicles' JWK Set (``trust``), its claims are type-checked, the ``vid`` claim must
  match the topic and the signing key's ``vid``, and a sequence number seen before is a
  replay within its ``stream`` (see :class:`SeqTracker`). Verified: ``{"vid", "topic",
  "kind", "seq", "stream", "boot", "ts", "signals", "quality", "age"?, "superseded"?,
  "kid", "alg", "verified": true, "retained"}`` (``stream`` is "" for messages without the
  claim; ``superseded: true`` for a message from a stream older than the vehicle's newest). Rejected: ``{"topic", "rejected":
  reason, "verified": false, "seq"?}``.
* ``<prefix>/<vid>/snapshot`` and ``<prefix>/<vid>/snapshot/<requester>`` (the response topics
  of snapshot requests, :mod:`agent.cloud.snapshot`): a JWS token checked as state is, whose
  ``kind`` claim must be ``"snapshot"``.
* ``<prefix>/<vid>/status``: unsigned ``online``/``offline`` (or a JSON object):
  ``{"vid", "topic", "kind": "status", "status", "verified": false, "retained"}``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from typing import Any, Callable

from agent.cloud.config import CloudConfig
from agent.cloud.revocation import CrlTrust
from agent.config import VEHICLE_ID_PATTERN
from agent.uplink.requests import REQUESTER_PATTERN
from agent.uplink.signing import VerificationError, Verifier

log = logging.getLogger("car_agent.cloud")

#: Larger payloads are rejected unread (a state message is a few KiB).
MAX_PAYLOAD_BYTES = 256 * 1024
#: Highest accepted ``seq`` (a signed 64-bit counter on the vehicle).
MAX_SEQ = 2**63 - 1

_KINDS = {"events": "event", "state": "state", "snapshot": "snapshot"}
#: ``ts`` plausibility: not before 2020-01-01 (an unset clock), not more than this ahead.
TS_FLOOR_MS = 1_577_836_800_000
MAX_TS_AHEAD_S = 3600.0
#: The ``stream`` claim (the agent sends 20 hex characters).
STREAM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


# --------------------------------------------------------------------------- replay detection


class SeqTracker:
    """Remembers which sequence numbers each vehicle's streams have had accepted.

    ``seq`` counts within a stream (the ``stream`` claim: one per outbox on the car; ""
    for agents that do not send the claim), so replays are tracked per ``(vid, stream)``:
    a watermark ``N`` ("every seq <= N has been seen") plus the set of seqs above it.
    Arrivals in any order are accepted once each. If gaps never fill (messages lost for
    good), the set is capped at ``window`` entries: the oldest gaps are then given up, and
    a seq below the new watermark is refused as too old.

    Which stream is a vehicle's newest (:meth:`note_stream`): the one whose earliest
    accepted message has the highest ``ts``. A car starts a new stream only when its
    outbox is recreated, so the new stream's first message is signed after every message
    of the old one; the cloud's ``ts`` plausibility check keeps a car's unset clock (before
    2020, or in the future) out of this comparison. At most ``max_streams`` streams per
    vehicle are remembered (the oldest starts are forgotten first).
    """

    def __init__(self, window: int = 4096, max_streams: int = 16) -> None:
        if window < 2:
            raise ValueError("window must be at least 2")
        self.window = window
        self.max_streams = max_streams
        self._floor: dict[tuple[str, str], int] = {}
        self._given_up: dict[tuple[str, str], int] = {}  # every seq <= this was abandoned
        self._above: dict[tuple[str, str], set[int]] = {}
        self._starts: dict[str, dict[str, int]] = {}    # vid -> stream -> earliest ts

    def watermark(self, vid: str, stream: str = "") -> int:
        """Every seq <= this has been accepted (or given up); 0 for a stream not seen yet."""
        return self._floor.get((vid, stream), 0)

    def seen(self, vid: str, seq: int, stream: str = "") -> bool:
        """Would ``seq`` be refused now? (Does not record anything.)"""
        key = (vid, stream)
        return seq <= self._floor.get(key, 0) or seq in self._above.get(key, ())

    def accept(self, vid: str, seq: int, stream: str = "") -> bool:
        """Record ``seq``; True if it is new, False if it was seen before (or is too old)."""
        key = (vid, stream)
        floor = self._floor.get(key, 0)
        if seq <= floor:
            return False
        above = self._above.get(key)
        if above is None:
            above = self._above[key] = set()
        elif seq in above:
            return False
        if seq == floor + 1:
            floor = seq
            while floor + 1 in above:
                floor += 1
                above.discard(floor)
            self._floor[key] = floor
        else:
            above.add(seq)
            if len(above) > self.window:
                self._give_up_oldest(key, above)
        return True

    def note_stream(self, vid: str, stream: str, ts: int) -> bool:
        """Record that ``stream`` had a message signed at ``ts``; True if it is the newest."""
        starts = self._starts.setdefault(vid, {})
        start = starts.get(stream)
        if start is None or ts < start:
            starts[stream] = ts
            if len(starts) > self.max_streams:
                oldest = min(starts, key=starts.__getitem__)
                del starts[oldest]
                for table in (self._floor, self._given_up, self._above):
                    table.pop((vid, oldest), None)
        return self.newest(vid) == stream

    def newest(self, vid: str) -> str | None:
        """The vehicle's newest stream (see the class), None for a vehicle not seen yet."""
        starts = self._starts.get(vid)
        if not starts:
            return None
        return max(starts, key=lambda name: (starts[name], name))

    def why_rejected(self, vid: str, seq: int, stream: str = "") -> str:
        """Reason text for a seq that :meth:`accept` refused."""
        if seq <= self._given_up.get((vid, stream), 0):
            return (f"duplicate or too old seq {seq} (older than the replay window of "
                    f"{self.window} out-of-order messages)")
        return f"duplicate seq {seq}"

    def _give_up_oldest(self, key: tuple[str, str], above: set[int]) -> None:
        ordered = sorted(above)
        keep = self.window // 2
        cut = ordered[-keep - 1]  # highest seq that stops being remembered individually
        remaining = set(ordered[-keep:])
        floor = cut
        while floor + 1 in remaining:
            floor += 1
            remaining.discard(floor)
        self._given_up[key] = cut
        self._floor[key] = floor
        self._above[key] = remaining


# --------------------------------------------------------------------------- message checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MessageChecker:
    """Turns one MQTT message (topic, payload) into a record dict. Never raises.

    Pure apart from the :class:`SeqTracker` (and the CRL file a :class:`CrlTrust` reads):
    no network, so it can be tested alone. With ``revocation``, every signed message must
    also pass :meth:`CrlTrust.check` (certificate of the key, CRL); without it nothing
    about certificates is checked.
    """

    def __init__(self, verifier: Verifier, topic_prefix: str = "vehicles",
                 tracker: SeqTracker | None = None, *,
                 revocation: CrlTrust | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.verifier = verifier
        self.clock = clock
        self.prefix_parts = topic_prefix.split("/")
        self.tracker = tracker if tracker is not None else SeqTracker()
        self.revocation = revocation

    def check(self, topic: str, payload: bytes, retained: bool = False) -> dict[str, Any]:
        try:
            return self._check(topic, bytes(payload), retained)
        except Exception as exc:  # noqa: BLE001 - a message must never crash the watcher
            log.exception("unexpected error checking a message on %r", topic)
            return _rejected(topic, f"internal error: {type(exc).__name__}")

    def _check(self, topic: str, payload: bytes, retained: bool) -> dict[str, Any]:
        parts = topic.split("/")
        n = len(self.prefix_parts)
        if len(parts) == n + 3 and parts[:n] == self.prefix_parts:
            why = _response_topic_problem(parts[n + 1:])
            if why is not None:
                return _rejected(topic, why)
            parts = parts[:n + 2]     # snapshot/<requester>: checked as snapshot
        if len(parts) != n + 2 or parts[:n] != self.prefix_parts:
            return _rejected(topic, "unexpected topic (expected "
                                    f"{'/'.join(self.prefix_parts)}/<vid>/events|state|status"
                                    "|snapshot)")
        vid, leaf = parts[n], parts[n + 1]
        if not VEHICLE_ID_PATTERN.fullmatch(vid):
            return _rejected(topic, "unexpected topic: not a valid vehicle id")
        if leaf not in ("events", "state", "status", "metrics", "snapshot"):
            return _rejected(topic, f"unexpected topic: unknown leaf {leaf[:40]!r} "
                                    "(expected events, state, status, metrics or snapshot)")
        if len(payload) > MAX_PAYLOAD_BYTES:
            return _rejected(topic, f"payload too large ({len(payload)} bytes, "
                                    f"limit {MAX_PAYLOAD_BYTES})")
        if leaf == "status":
            return self._status(topic, vid, payload, retained)
        if leaf == "metrics":
            return self._metrics(topic, vid, payload)
        if not payload:
            return _rejected(topic, "empty payload")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _rejected(topic, f"malformed: payload is not UTF-8 (byte {exc.start})")

        try:
            header, claims = self.verifier.verify(text.strip())
        except VerificationError as exc:
            return _rejected(topic, str(exc))

        problem = _claims_problem(claims)
        if problem:
            return _rejected(topic, f"bad claims: {problem}")
        seq = claims["seq"]
        claim_vid = claims["vid"]
        if claim_vid != vid:
            return _rejected(topic, f"vid claim {claim_vid[:64]!r} does not match the topic's "
                                    f"vehicle {vid!r}", seq)
        kid = header.get("kid")
        jwk = self.verifier.jwk(kid) if isinstance(kid, str) else None
        key_vid = jwk.get("vid") if jwk else None
        if key_vid is not None and key_vid != claim_vid:
            return _rejected(topic, f"signing key {kid} belongs to vehicle {str(key_vid)[:64]!r}, "
                                    f"not {claim_vid!r}", seq)
        if self.revocation is not None:
            cert = self.verifier.certificate(kid) if isinstance(kid, str) else None
            why = self.revocation.check(kid if isinstance(kid, str) else None, cert, claim_vid)
            if why is not None:
                return _rejected(topic, why, seq)
        why = self._implausible_ts(claims["ts"])
        if why is not None:
            return _rejected(topic, why, seq)
        # A snapshot must say so: a state token must not pass as the answer to a request.
        kind = claims.get("kind", _KINDS[leaf] if leaf != "snapshot" else None)
        if kind != _KINDS[leaf]:
            return _rejected(topic, f"kind claim {str(kind)[:32]!r} does not match topic "
                                    f"{leaf!r}", seq)
        stream = claims.get("stream", "")
        if not self.tracker.accept(vid, seq, stream):
            return _rejected(topic, self.tracker.why_rejected(vid, seq, stream), seq)
        newest = self.tracker.note_stream(vid, stream, claims["ts"])

        record: dict[str, Any] = {
            "vid": vid,
            "topic": topic,
            "kind": kind,
            "seq": seq,
            "stream": stream,
            "boot": claims["boot"],
            "ts": claims["ts"],
            "signals": claims["signals"],
            "quality": claims.get("quality") or {},
        }
        if "age" in claims:
            record["age"] = claims["age"]
        if not newest:
            # From a stream the car has since replaced (a recreated outbox): genuine, but it
            # must never overwrite what the newer stream said.
            record["superseded"] = True
        record.update(kid=kid, alg=header.get("alg"), verified=True, retained=retained)
        return record

    def _implausible_ts(self, ts: int) -> str | None:
        """Why ``ts`` cannot be when the message was signed, or None."""
        if ts < TS_FLOOR_MS:
            return (f"implausible ts {ts_text(ts)}: before {ts_text(TS_FLOOR_MS)[:10]} (the "
                    "vehicle's clock was not set)")
        ahead = ts / 1000 - self.clock()
        if ahead > MAX_TS_AHEAD_S:
            return (f"implausible ts {ts_text(ts)}: {ahead:.0f} s ahead of this clock (more "
                    f"than {MAX_TS_AHEAD_S:.0f} s)")
        return None

    @staticmethod
    def _metrics(topic: str, vid: str, payload: bytes) -> dict[str, Any]:
        return _metrics_record(topic, vid, payload)

    @staticmethod
    def _status(topic: str, vid: str, payload: bytes, retained: bool) -> dict[str, Any]:
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            return _rejected(topic, f"malformed: status is not UTF-8 (byte {exc.start})")
        # Status is not signed (it is also the broker-published last will): never verified.
        record: dict[str, Any] = {"vid": vid, "topic": topic, "kind": "status",
                                  "status": text, "verified": False, "retained": retained}
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                state = obj.get("status", obj.get("state"))
                record["status"] = state if isinstance(state, str) else json.dumps(
                    obj, sort_keys=True, separators=(",", ":"))
                record["detail"] = obj
        return record


def checker_for(config: CloudConfig, tracker: SeqTracker | None = None,
                on_problem: Callable[[str], None] | None = None) -> MessageChecker:
    """The checker a cloud config describes: its JWK Set, topic prefix and (optional) CRL.

    An expired CRL is reported through ``on_problem`` at once, not at the first message.

    :raises UserError: the key set or the CRL cannot be read (one line).
    """
    revocation = None
    if config.crl is not None:
        revocation = CrlTrust(config.crl, config.ca, where=f"{config.file}: crl",
                              ca_where=f"{config.file}: mqtt.ca", on_problem=on_problem)
    checker = MessageChecker(Verifier.from_jwks_file(config.trust), config.topic_prefix, tracker,
                             revocation=revocation)
    if revocation is not None:
        revocation.problem()
    return checker


def _metrics_record(topic: str, vid: str, payload: bytes) -> dict[str, Any]:
    """Health metrics (unsigned JSON): shown, never verified, never trusted for state."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _rejected(topic, "malformed: metrics are not a JSON object")
    if not isinstance(obj, dict):
        return _rejected(topic, "malformed: metrics are not a JSON object")
    return {"vid": vid, "topic": topic, "kind": "metrics", "metrics": obj, "verified": False}


def _response_topic_problem(leaves: list[str]) -> str | None:
    """Why ``<vid>/<a>/<b>`` is not a snapshot response topic (None if it is one)."""
    if leaves[0] == "cmd":
        return "a request to the vehicle (cmd), not a message from it"
    if leaves[0] != "snapshot":
        return (f"unexpected topic: unknown leaf {leaves[0][:40]!r}/... (only snapshot/<requester> "
                "has a level below the leaf)")
    if not REQUESTER_PATTERN.fullmatch(leaves[1]):
        return "unexpected topic: the requester id is not 1-64 of A-Z a-z 0-9 _ -"
    return None


def _claims_problem(claims: dict[str, Any]) -> str | None:
    """What is wrong with the claims' shape, or None."""
    vid = claims.get("vid")
    if not isinstance(vid, str):
        return "'vid' missing or not a string"
    seq = claims.get("seq")
    if not _is_int(seq) or not 1 <= seq <= MAX_SEQ:
        return "'seq' missing or not an integer >= 1"
    for name in ("boot", "ts"):
        value = claims.get(name)
        if not _is_int(value) or value < 0:
            return f"{name!r} missing or not a non-negative integer"
    if not isinstance(claims.get("signals"), dict):
        return "'signals' missing or not an object"
    for name in ("quality", "age"):
        if name in claims and not isinstance(claims[name], dict):
            return f"{name!r} is not an object"
    if "kind" in claims and not isinstance(claims["kind"], str):
        return "'kind' is not a string"
    if "stream" in claims and not (isinstance(claims["stream"], str)
                                   and STREAM_PATTERN.fullmatch(claims["stream"])):
        return "'stream' is not a string of 1-64 letters, digits, '_' or '-'"
    return None


def iso_utc(seconds: float, timespec: str = "milliseconds") -> str:
    """Unix seconds as ISO 8601 UTC ending in ``Z`` (as records, the API and answers say it)."""
    moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def ts_text(ts_ms: int) -> str:
    """A ``ts`` claim as ISO 8601 UTC with milliseconds (``ts=N`` if out of range)."""
    try:
        return iso_utc(ts_ms / 1000)
    except (OverflowError, OSError, ValueError):
        return f"ts={ts_ms}"


def _rejected(topic: str, reason: str, seq: int | None = None) -> dict[str, Any]:
    # Reasons can quote attacker-controlled text (a header's alg): keep them one line.
    reason = "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason[:500])
    record: dict[str, Any] = {"topic": topic, "rejected": reason, "verified": False}
    if seq is not None:
        record["seq"] = seq
    return record


