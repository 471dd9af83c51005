"""Signed envelopes: the claims the cloud relies on, as JWS compact serializations.

Claims (a contract): ``vid``, ``stream`` (the outbox's random stream id: ``seq`` counts within
it), ``seq``, ``boot``, ``ts`` (ms since the Unix epoch, at signing),
``signals`` ({VSS path: value, null when not valid}), ``quality`` ({VSS path: quality} for every
signal that is not valid). Extras: ``kind`` ("event"/"state"/"snapshot") and, on state and
snapshot, ``age`` ({VSS path: seconds since its last frame, null if never received}). A
snapshot is a state sent on request (``agent.uplink.requests``): the same claims, its own kind.

The outbox allocates ``seq`` inside its transaction, so envelopes are built as
``make_payload(seq) -> bytes`` callables.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

from agent.signals.model import VALID
from agent.uplink.jws import Signer
from agent.signals.state import VehicleState

PayloadFactory = Callable[[int], bytes]


#: Longest JSON numbers expected in a snapshot: a value (e.g. ``-1.2345678901234567e+300``) and
#: an age in seconds; the header and signature of the longest algorithm we sign with.
_LONG_VALUE = -1.2345678901234567e+300
_LONG_AGE = 1234567.891
_HEADER_CHARS = len(json.dumps({"alg": "ES256", "kid": "k" * 43, "typ": "JWT"},
                               separators=(",", ":")))
_SIGNATURE_BYTES = 64


def snapshot_size_bound(paths: tuple[str, ...], vehicle_id: str) -> int:
    """Bytes of the largest full snapshot (a signed ``state``) for these signals, as a token.

    Every signal valid with a long number and an age, or every signal invalid: the larger.
    """
    def payload(signals: dict, quality: dict) -> int:
        claims = {"vid": vehicle_id, "stream": "s" * 20, "seq": 2**63 - 1, "boot": 2**31,
                  "ts": 10**13, "kind": "state", "signals": signals, "quality": quality,
                  "age": dict.fromkeys(paths, _LONG_AGE)}
        return len(json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode())

    biggest = max(payload(dict.fromkeys(paths, _LONG_VALUE), {}),
                  payload(dict.fromkeys(paths), dict.fromkeys(paths, "invalid")))

    def b64(n: int) -> int:
        return math.ceil(n * 4 / 3)

    return b64(_HEADER_CHARS) + 1 + b64(biggest) + 1 + b64(_SIGNATURE_BYTES)


class Envelopes:
    def __init__(self, signer: Signer, vehicle_id: str, boot: int,
                 clock: Callable[[], float] = time.time, *, stream: str | None = None) -> None:
        self.signer = signer
        self.vehicle_id = vehicle_id
        self.boot = boot
        self.clock = clock
        self.stream = stream

    def _claims(self, seq: int, kind: str) -> dict:
        claims = {"vid": self.vehicle_id, "seq": seq, "boot": self.boot,
                  "ts": int(self.clock() * 1000), "kind": kind}
        if self.stream is not None:
            claims["stream"] = self.stream
        return claims

    def event(self, changes) -> PayloadFactory:
        signals = {}
        quality = {}
        for change in changes:
            signals[change.path] = change.value if change.quality == VALID else None
            if change.quality != VALID:
                quality[change.path] = change.quality
        return self._factory("event", signals, quality, None)

    def state(self, state: VehicleState, now: float, kind: str = "state") -> PayloadFactory:
        signals = {}
        quality = {}
        age = {}
        for path, entry in state.snapshot(now).items():
            valid = entry["quality"] == VALID
            signals[path] = entry["value"] if valid else None
            if not valid:
                quality[path] = entry["quality"]
            age[path] = entry["age"]
        return self._factory(kind, signals, quality, age)

    def snapshot(self, state: VehicleState, now: float) -> PayloadFactory:
        """The state's claims with ``"kind": "snapshot"``: the answer to a request."""
        return self.state(state, now, kind="snapshot")

    def _factory(self, kind: str, signals: dict, quality: dict, age: dict | None) -> PayloadFactory:
        def make_payload(seq: int) -> bytes:
            claims = self._claims(seq, kind)
            claims["signals"] = signals
            claims["quality"] = quality
            if age is not None:
                claims["age"] = age
            return self.signer.sign(claims).encode("ascii")
        return make_payload
