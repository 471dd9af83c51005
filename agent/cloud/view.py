"""What the cloud knows of one vehicle: the last verified value of each signal, with its age.

A :class:`VehicleView` is built only from records that :class:`agent.cloud.checks.MessageChecker`
verified (``state``, ``event`` and ``snapshot`` messages) and from the vehicle's unsigned
``status`` (online/offline). :func:`merge` folds one record in:

- each signal's reading is dated in vehicle time: ``ts`` of the message, less the signal's
  ``age`` on a state or snapshot (the value was true as of its last frame, not the signing);
- a reading never replaces a newer one, so a message that arrives late (QoS 1 resends after a
  reconnect, a slow instance of a share group) cannot roll the state back;
- the last *valid* value is kept beside the current quality: when a signal turns stale or
  invalid, the owner is told it is unknown now, and what it was when last known.

Plain frozen data, no I/O: ``status``, ``serve``'s store and the answer all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

VALID = "valid"
SIGNED_KINDS = ("state", "event", "snapshot")


@dataclass(frozen=True)
class Reading:
    """One signal as last reported: current quality, and the last valid value."""

    quality: str                    # "valid", "invalid" or "stale" (as the car said)
    as_of: float                    # vehicle time (s since the epoch) of the current quality
    value: Any = None               # the last valid value (None if never valid)
    valid_as_of: float | None = None    # vehicle time the last valid value was true

    @property
    def valid(self) -> bool:
        return self.quality == VALID

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "quality": self.quality, "as_of": self.as_of,
                "valid_as_of": self.valid_as_of}


@dataclass(frozen=True)
class Source:
    """The signed message a view's newest data comes from."""

    seq: int
    boot: int
    kid: str
    stream: str = ""
    ts: float = 0.0                 # its ``ts``, s since the epoch

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "boot": self.boot, "kid": self.kid, "stream": self.stream}


@dataclass(frozen=True)
class VehicleView:
    vid: str
    readings: Mapping[str, Reading] = field(default_factory=lambda: MappingProxyType({}))
    source: Source | None = None    # newest signed message merged
    online: bool | None = None      # from the retained status topic; None: never heard

    @property
    def as_of(self) -> float | None:
        """Vehicle time of the newest verified message, or None before the first."""
        return self.source.ts if self.source is not None else None


def online_of(status: Any) -> bool | None:
    """The retained ``status`` payload as online (True), offline (False) or unknown (None)."""
    return True if status == "online" else False if status == "offline" else None


def _newer(a: Source, b: Source | None) -> bool:
    """Is message ``a`` newer than ``b``? Within one stream (one outbox) seq decides, across
    restarts too; across streams (a recreated outbox) the signing time does."""
    if b is None:
        return True
    if a.stream == b.stream:
        return a.seq > b.seq
    return (a.ts, a.seq) > (b.ts, b.seq)


def source_of(record: dict[str, Any]) -> Source:
    return Source(seq=int(record["seq"]), boot=int(record["boot"]), kid=str(record["kid"]),
                  stream=str(record.get("stream") or ""), ts=record["ts"] / 1000.0)


def merge(view: VehicleView | None, record: dict[str, Any]) -> VehicleView:
    """``view`` with one verified record folded in (a new view; ``view`` is not changed).

    ``record`` is a MessageChecker record with ``verified: true`` (or a status record). Other
    records (rejections, metrics) leave the view as it is.
    """
    vid = record.get("vid")
    if view is None:
        view = VehicleView(vid=vid)
    if record.get("kind") == "status":
        online = online_of(record.get("status"))
        return replace(view, online=view.online if online is None else online)
    if not record.get("verified") or record.get("kind") not in SIGNED_KINDS:
        return view
    source = source_of(record)
    ts = source.ts
    ages = record.get("age") or {}
    quality = record.get("quality") or {}
    readings = dict(view.readings)
    for path, value in (record.get("signals") or {}).items():
        age = ages.get(path)
        as_of = ts - age if isinstance(age, (int, float)) and not isinstance(age, bool) else ts
        old = readings.get(path)
        if old is not None and (old.as_of > as_of or (old.as_of == as_of and not _newer(
                source, view.source))):
            continue
        q = quality.get(path, VALID)
        if q == VALID:
            readings[path] = Reading(quality=VALID, as_of=as_of, value=value, valid_as_of=as_of)
        else:
            readings[path] = Reading(quality=q, as_of=as_of,
                                     value=old.value if old else None,
                                     valid_as_of=old.valid_as_of if old else None)
    newest = source if _newer(source, view.source) else view.source
    return replace(view, readings=MappingProxyType(readings), source=newest)
