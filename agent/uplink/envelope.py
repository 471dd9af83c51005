"""Signed envelopes: the claims the cloud relies on, as JWS compact serializations.

Claims (a contract): ``vid``, ``seq``, ``boot``, ``ts`` (ms since the Unix epoch, at signing),
``signals`` ({VSS path: value, null when not valid}), ``quality`` ({VSS path: quality} for every
signal that is not valid). Extras: ``kind`` ("event"/"state"/"snapshot") and, on state and
snapshot, ``age`` ({VSS path: seconds since its last frame, null if never received}). A
snapshot is a state sent on request (``agent.uplink.requests``): the same claims, its own kind.

The outbox allocates ``seq`` inside its transaction, so envelopes are built as
``make_payload(seq) -> bytes`` callables.
"""

from __future__ import annotations

import time
from typing import Callable

from agent.signals.model import VALID
from agent.uplink.signing import Signer
from agent.signals.state import VehicleState

PayloadFactory = Callable[[int], bytes]


class Envelopes:
    def __init__(self, signer: Signer, vehicle_id: str, boot: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.signer = signer
        self.vehicle_id = vehicle_id
        self.boot = boot
        self.clock = clock

    def _claims(self, seq: int, kind: str) -> dict:
        return {"vid": self.vehicle_id, "seq": seq, "boot": self.boot,
                "ts": int(self.clock() * 1000), "kind": kind}

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
