"""A simulated drive as a candump -L capture, built from the DBC and the mapping.

The scenario is written in VSS terms (fuel level, doors, a window, the trunk) and turned into
raw frame contents through the mapping in reverse, so it works for any vehicle whose mapping
covers those signals. Every DBC message is sent at its GenMsgCycleTime; unmapped signals follow
slow deterministic waves within their ranges; signals named ``*Counter`` count and ``*Checksum``
hold (sum of the other bytes + low byte of the frame id) & 0xFF, the demo DBC's checksum rule.
Extra frames with ids the DBC does not know fill the bus up to ``bus_load`` frames/s.
Deterministic for a given seed.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import can
from cantools.database.can import Message, Signal

from agent.can.capture import format_candump
from agent.signals.vehicle import Vehicle

#: 2026-01-01T00:00:00Z: simulated captures start here, so output depends only on the seed.
EPOCH = 1767225600.0
DEFAULT_BUS_LOAD = 2000.0
FILLER_CYCLE_S = 0.010
DEFAULT_CYCLE_S = 0.1

P = "Vehicle.Powertrain.FuelSystem."
DOOR = "Vehicle.Cabin.Door."


def scenario(t: float, duration: float) -> dict[str, Any]:
    """Published VSS values at time ``t`` of a drive lasting ``duration`` seconds.

    Parked, unlocked, driver door opens and closes, drive (fuel burns, a window opens and
    closes partly, the range estimate is briefly not available), park, trunk opens.
    ``None`` means "send the signal's sentinel".
    """
    f = t / duration if duration > 0 else 0.0
    level = max(0.0, 62.4 - 0.05 * t)          # % ; burns 3 %/min for a visible demo
    litres = level * 0.55                       # 55 l tank
    range_m = litres / 6.5 * 100 * 1000         # 6.5 l/100 km
    unlocked = 0.05 <= f < 0.25 or f >= 0.88
    window = 0.0
    if 0.30 <= f < 0.40:
        window = (f - 0.30) / 0.10 * 40.0
    elif 0.40 <= f < 0.60:
        window = 40.0
    elif 0.60 <= f < 0.65:
        window = 40.0 - (f - 0.60) / 0.05 * 30.0
    elif f >= 0.65:
        window = 10.0
    values: dict[str, Any] = {
        P + "RelativeLevel": level,
        P + "AbsoluteLevel": litres,
        P + "Range": None if 0.45 <= f < 0.47 else range_m,
        P + "IsFuelLevelLow": level < 10.0,
        "Vehicle.Body.Trunk.Rear.IsOpen": f >= 0.92,
        "Vehicle.Body.Hood.IsOpen": False,
        "Vehicle.Exterior.AirTemperature": 18.5 + 2.0 * math.sin(t / 60.0),
    }
    for row in ("Row1", "Row2"):
        for side in ("DriverSide", "PassengerSide"):
            base = f"{DOOR}{row}.{side}."
            values[base + "IsOpen"] = (row, side) == ("Row1", "DriverSide") and (
                0.10 <= f < 0.18 or f >= 0.90)
            values[base + "IsLocked"] = not unlocked
            values[base + "Window.Position"] = window if (row, side) == ("Row1", "DriverSide") \
                else 0.0
    return values


@dataclass
class SimulationSummary:
    frames: int
    duration: float
    mapped_messages: int
    dbc_messages: int
    filler_ids: int


class _Sender:
    """One DBC message's encoder: scenario values in, raw payloads out."""

    def __init__(self, message: Message, specs: list, rng: random.Random) -> None:
        self.message = message
        self.cycle = (message.cycle_time or 0) / 1000.0 or DEFAULT_CYCLE_S
        mux = [s for s in message.signals if s.is_multiplexer]
        self.mux_signal: Signal | None = mux[0] if mux else None
        self.pages = sorted({p for s in message.signals for p in (s.multiplexer_ids or ())})
        self.page = 0
        self.counter = 0
        # spec per (signal name, mux page or None)
        self.specs = {}
        for spec, mux_value in specs:
            self.specs[(spec.signal, mux_value)] = spec
        self.waves = {s.name: (rng.uniform(5.0, 40.0), rng.uniform(0, 2 * math.pi))
                      for s in message.signals}

    def payload(self, t: float, values: dict[str, Any]) -> bytes:
        msg = self.message
        page = None
        if self.mux_signal is not None and self.pages:
            page = self.pages[self.page % len(self.pages)]
            self.page += 1
        raw: dict[str, Any] = {}
        checksum = None
        for sig in msg.signals:
            if sig.multiplexer_ids and page not in sig.multiplexer_ids:
                continue
            if sig.is_multiplexer:
                raw[sig.name] = page if page is not None else 0
                continue
            name = sig.name.lower()
            if name.endswith("counter"):
                raw[sig.name] = self.counter % (1 << sig.length)
                continue
            if name.endswith(("checksum", "crc")):
                checksum = sig
                raw[sig.name] = 0
                continue
            spec = self.specs.get((sig.name, page)) or self.specs.get((sig.name, None))
            if spec is not None and spec.path in values:
                raw[sig.name] = _raw_for(spec, sig, values[spec.path])
            else:
                raw[sig.name] = _wave(sig, t, *self.waves[sig.name])
        self.counter += 1
        data = bytearray(msg.encode(raw, scaling=False, strict=False, padding=False))
        byte_aligned = checksum is not None and checksum.length == 8 and (
            checksum.start % 8 == (0 if checksum.byte_order == "little_endian" else 7))
        if byte_aligned:
            byte = checksum.start // 8
            data[byte] = (sum(data[:byte]) + sum(data[byte + 1:]) + (msg.frame_id & 0xFF)) & 0xFF
        return bytes(data)


def _raw_for(spec, sig: Signal, published: Any) -> Any:
    """The raw value that decodes (through the mapping) to ``published``."""
    if published is None:
        return spec.invalid[0] if spec.invalid else _raw_of(sig, sig.maximum or 0)
    if spec.values is not None:
        for key, value in spec.values:
            if value == published and type(value) is type(published):
                if isinstance(key, int):
                    return key
                for raw, choice in (sig.choices or {}).items():
                    if str(choice) == key:
                        return int(raw)
        return 0
    physical = (published - spec.offset) / spec.scale
    return _raw_of(sig, physical)


def _raw_of(sig: Signal, physical: float) -> Any:
    if sig.is_float:
        return float(physical)
    raw = round((physical - sig.offset) / sig.scale)
    top = (1 << (sig.length - 1)) - 1 if sig.is_signed else (1 << sig.length) - 1
    bottom = -(1 << (sig.length - 1)) if sig.is_signed else 0
    return max(bottom, min(top, raw))


def _wave(sig: Signal, t: float, period: float, phase: float) -> Any:
    lo = sig.minimum if sig.minimum is not None else 0.0
    hi = sig.maximum if sig.maximum is not None else lo
    if sig.length == 1:
        return int(math.sin(2 * math.pi * t / period + phase) > 0.6)
    physical = lo + (hi - lo) * (0.5 + 0.35 * math.sin(2 * math.pi * t / period + phase))
    return _raw_of(sig, physical)


def generate(vehicle: Vehicle, duration: float, seed: int = 1,
             bus_load: float = DEFAULT_BUS_LOAD, channel: str | None = None,
             values: Callable[[float, float], dict[str, Any]] = scenario,
             ) -> Iterator[can.Message]:
    """Frames of the simulated drive, in time order."""
    rng = random.Random(seed)
    if channel is None:
        can_config = vehicle.config.can
        channel = (can_config.channel if can_config and can_config.channel else None) or "vcan0"
    specs_by_message: dict[str, list] = {}
    decoder = vehicle.decoder()
    for spec in vehicle.mapping.signals:
        message = vehicle.database.find(spec.message)
        mux_value = decoder.mux_values[decoder.paths.index(spec.path)]
        specs_by_message.setdefault(message.name, []).append((spec, mux_value))
    senders = [_Sender(m, specs_by_message.get(m.name, []), rng)
               for m in vehicle.database.by_key.values()]

    dbc_rate = sum(1.0 / s.cycle for s in senders)
    used = {m.frame_id for m in vehicle.database.by_key.values()}
    free = [i for i in range(0x100, 0x7F0) if i not in used]
    filler_count = max(0, int(round((bus_load - dbc_rate) * FILLER_CYCLE_S)))
    filler_ids = sorted(rng.sample(free, min(filler_count, len(free))))
    filler_data = {i: bytearray(rng.randbytes(8)) for i in filler_ids}

    heap: list[tuple[float, int]] = []
    for n, sender in enumerate(senders):
        heapq.heappush(heap, (rng.uniform(0, sender.cycle), n))
    for n, ident in enumerate(filler_ids):
        heapq.heappush(heap, (rng.uniform(0, FILLER_CYCLE_S), len(senders) + n))

    last_t = 0.0
    cache_t = -1.0
    current: dict[str, Any] = {}
    while heap:
        t, n = heapq.heappop(heap)
        if t >= duration:
            continue
        if t - cache_t >= 0.01:  # scenario values at 10 ms resolution
            current = values(t, duration)
            cache_t = t
        jitter = rng.uniform(0, 0.0002)
        stamp = max(last_t + 1e-6, round(EPOCH + t + jitter, 6))   # strictly increasing, in µs
        last_t = stamp
        if n < len(senders):
            sender = senders[n]
            msg = sender.message
            yield can.Message(timestamp=round(stamp, 6), arbitration_id=msg.frame_id,
                              is_extended_id=msg.is_extended_frame, is_fd=msg.is_fd,
                              data=sender.payload(t, current), channel=channel)
            heapq.heappush(heap, (t + sender.cycle, n))
        else:
            ident = filler_ids[n - len(senders)]
            data = filler_data[ident]
            data[7] = (data[7] + 1) & 0xFF              # a rolling counter, like real ECUs
            if rng.random() < 0.05:
                data[rng.randrange(7)] = rng.randrange(256)
            yield can.Message(timestamp=round(stamp, 6), arbitration_id=ident,
                              is_extended_id=False, data=bytes(data), channel=channel)
            heapq.heappush(heap, (t + FILLER_CYCLE_S, n))


def write_capture(vehicle: Vehicle, out: Path | TextIO, duration: float, seed: int = 1,
                  bus_load: float = DEFAULT_BUS_LOAD, channel: str | None = None) -> int:
    """Write the simulated drive as candump -L; returns the number of frames."""
    count = 0
    handle = open(out, "w", encoding="ascii") if isinstance(out, Path) else out
    try:
        lines = []
        for msg in generate(vehicle, duration, seed, bus_load, channel):
            lines.append(format_candump(msg))
            count += 1
            if len(lines) >= 4096:
                handle.write("\n".join(lines) + "\n")
                lines.clear()
        if lines:
            handle.write("\n".join(lines) + "\n")
    finally:
        if isinstance(out, Path):
            handle.close()
    return count
