"""Expected values of the demo vehicle, decoded by hand from the raw bytes of a candump -L file.

Independent of the project's decoder (no cantools, no SignalPipeline): the bit positions are
written down here from dbc/demo_vehicle.dbc and config/mapping/demo_vehicle.yaml, so a test
comparing the agent's output with these values checks the agent against the DBC, not against
itself.
"""

from __future__ import annotations

import struct
from pathlib import Path

CLUSTER, BODY, WINDOWS, AMBIENT = 0x3D0, 0x2B0, 0x3C8, 0x18FF50E5

DOORS = {  # BodyStatus (little-endian), 2-bit fields: 0 CLOSED, 1 OPEN, 2 ERROR, 3 SNA
    "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen": 0,
    "Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen": 2,
    "Vehicle.Cabin.Door.Row2.DriverSide.IsOpen": 4,
    "Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen": 6,
    "Vehicle.Body.Trunk.Rear.IsOpen": 12,
    "Vehicle.Body.Hood.IsOpen": 14,
}
LOCKS = {  # BodyStatus, 1-bit fields: 0 UNLOCKED, 1 LOCKED
    "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked": 8,
    "Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked": 9,
    "Vehicle.Cabin.Door.Row2.DriverSide.IsLocked": 10,
    "Vehicle.Cabin.Door.Row2.PassengerSide.IsLocked": 11,
}
WINDOW_PATHS = ("Vehicle.Cabin.Door.Row1.DriverSide.Window.Position",     # WindowIndex 0
                "Vehicle.Cabin.Door.Row1.PassengerSide.Window.Position",  # 1
                "Vehicle.Cabin.Door.Row2.DriverSide.Window.Position",     # 2
                "Vehicle.Cabin.Door.Row2.PassengerSide.Window.Position")  # 3


def last_frames(capture: Path) -> tuple[dict, dict]:
    """({frame id: data of its last frame}, {window index: data of its last frame})."""
    last: dict[int, bytes] = {}
    windows: dict[int, bytes] = {}
    for line in capture.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or "#" not in parts[2]:
            continue
        ident, _, data = parts[2].partition("#")
        if data.startswith("R") or data.startswith("#"):
            continue
        payload = bytes.fromhex(data)
        frame_id = int(ident, 16)
        last[frame_id] = payload
        if frame_id == WINDOWS and payload:
            windows[payload[0] & 0x3] = payload
    return last, windows


def door_changes(capture: Path, path: str) -> list[object]:
    """The successive values of one BodyStatus door/lid ``path`` over the capture (a value
    is listed when it differs from the one before; None: ERROR or SNA)."""
    values: list[object] = []
    for line in capture.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[2].upper().startswith(f"{BODY:03X}#"):
            continue
        body = int.from_bytes(bytes.fromhex(parts[2].split("#", 1)[1]), "little")
        value = {0: False, 1: True}.get((body >> DOORS[path]) & 0x3)
        if not values or values[-1] != value:
            values.append(value)
    return values


def final_values(capture: Path) -> dict[str, object]:
    """The value each mapped signal has after the capture's last frame (None: invalid)."""
    last, windows = last_frames(capture)
    out: dict[str, object] = {}

    c = last[CLUSTER]                       # Motorola: bit 7 of byte 0 is the MSB of FuelPct
    pct = c[0]                              # FuelLevelPct 7|8@0+ (0.4), SNA 255, max 100 %
    out["Vehicle.Powertrain.FuelSystem.RelativeLevel"] = \
        None if pct == 255 or pct * 0.4 > 100 else round(pct * 0.4, 1)
    km = (c[1] << 2) | (c[2] >> 6)          # RangeKm 15|10@0+, SNA 1023, max 1022
    out["Vehicle.Powertrain.FuelSystem.Range"] = None if km >= 1023 else km * 1000
    litres = ((c[2] & 0x3F) << 4) | (c[3] >> 4)   # FuelLitres 21|10@0+ (0.1), max 100 l
    out["Vehicle.Powertrain.FuelSystem.AbsoluteLevel"] = \
        None if litres == 1023 or litres > 1000 else round(litres * 0.1, 1)
    out["Vehicle.Powertrain.FuelSystem.IsFuelLevelLow"] = bool((c[3] >> 3) & 1)   # 27|1@0+

    body = int.from_bytes(last[BODY], "little")
    for path, bit in DOORS.items():
        raw = (body >> bit) & 0x3
        out[path] = {0: False, 1: True}.get(raw)
    for path, bit in LOCKS.items():
        out[path] = bool((body >> bit) & 1)

    for index, path in enumerate(WINDOW_PATHS):   # WindowPosition m0 8|7@1+, SNA 127, max 100
        if index in windows:
            raw = windows[index][1] & 0x7F
            out[path] = None if raw == 127 or raw > 100 else raw

    if AMBIENT in last:                     # AmbientTemp 0|32@1- IEEE float, [-60|80], 1 decimal
        temp = struct.unpack("<f", last[AMBIENT][:4])[0]
        out["Vehicle.Exterior.AirTemperature"] = \
            round(temp, 1) if -60 <= temp <= 80 else None
    return out
