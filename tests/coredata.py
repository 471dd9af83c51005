"""Shared helpers for the core test files (config, mapping, DBC, decode, state, capture,
simulator, CLI): repository paths, the demo vehicle, and frame payloads packed by hand.

The packers below are written from the DBC's bit layout, not with cantools, so that tests
which use them check the decoder against an independent encoding (test_decode.py checks the
packers against cantools once).
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import can
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_CONFIG = REPO / "config" / "demo.yaml"
DEMO_DBC = REPO / "dbc" / "demo_vehicle.dbc"
DEMO_MAPPING = REPO / "config" / "mapping" / "demo_vehicle.yaml"

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"real DBC files not available: {SHARED_DATA} is missing",
)

# VSS paths of the demo mapping.
FUEL = "Vehicle.Powertrain.FuelSystem."
REL = FUEL + "RelativeLevel"
ABS = FUEL + "AbsoluteLevel"
RANGE = FUEL + "Range"
LOW = FUEL + "IsFuelLevelLow"
DOOR = "Vehicle.Cabin.Door."
DOORS = [f"{DOOR}{r}.{s}" for r, s in (("Row1", "DriverSide"), ("Row1", "PassengerSide"),
                                       ("Row2", "DriverSide"), ("Row2", "PassengerSide"))]
IS_OPEN = [d + ".IsOpen" for d in DOORS]        # FL, FR, RL, RR
IS_LOCKED = [d + ".IsLocked" for d in DOORS]
WINDOWS = [d + ".Window.Position" for d in DOORS]  # mux pages 0..3
TRUNK = "Vehicle.Body.Trunk.Rear.IsOpen"
HOOD = "Vehicle.Body.Hood.IsOpen"
AIR = "Vehicle.Exterior.AirTemperature"
CLUSTER_PATHS = [REL, ABS, RANGE, LOW]
BODY_PATHS = IS_OPEN + IS_LOCKED + [TRUNK, HOOD]
ALL_DEMO_PATHS = CLUSTER_PATHS + BODY_PATHS + WINDOWS + [AIR]

CLUSTER_ID = 0x3D0
BODY_ID = 0x2B0
WINDOW_ID = 0x3C8
AMBIENT_ID = 0x18FF50E5

CLOSED, OPEN, ERROR, SNA = 0, 1, 2, 3


@functools.lru_cache(maxsize=1)
def demo_vehicle():
    """The demo vehicle (config + DBC + mapping); callers take fresh decoders from it."""
    from agent.signals.vehicle import load_vehicle

    return load_vehicle(DEMO_CONFIG)


def demo_decoder():
    return demo_vehicle().decoder()


def checksum(data: bytes | bytearray, frame_id: int) -> int:
    """The demo DBC's rule: (sum of bytes 0..6 + low byte of the frame id) & 0xFF."""
    return (sum(data[:7]) + (frame_id & 0xFF)) & 0xFF


def cluster_payload(fuel: int, range_km: int, litres: int, low: int = 0, counter: int = 0,
                    check: int | None = None) -> bytes:
    """Cluster 0x3D0, big-endian: FuelLevelPct 7|8, RangeKm 15|10, FuelLitres 21|10,
    LowFuelWarning 27|1, ClusterCounter 55|4, ClusterChecksum 63|8 (raw values)."""
    b = bytearray(8)
    b[0] = fuel
    b[1] = range_km >> 2
    b[2] = ((range_km & 0x3) << 6) | (litres >> 4)
    b[3] = ((litres & 0xF) << 4) | (low << 3)
    b[6] = (counter & 0xF) << 4
    b[7] = checksum(b, CLUSTER_ID) if check is None else check
    return bytes(b)


def body_payload(doors=(CLOSED,) * 4, locks=(0,) * 4, trunk: int = CLOSED, hood: int = CLOSED,
                 counter: int = 0) -> bytes:
    """BodyStatus 0x2B0, little-endian: DoorFL..RR 2 bits each in byte 0, LockFL..RR bits 8..11,
    Trunk 12|2, Hood 14|2, BodyCounter 48|4, BodyChecksum 56|8."""
    b = bytearray(8)
    b[0] = doors[0] | doors[1] << 2 | doors[2] << 4 | doors[3] << 6
    b[1] = locks[0] | locks[1] << 1 | locks[2] << 2 | locks[3] << 3 | trunk << 4 | hood << 6
    b[6] = counter & 0xF
    b[7] = checksum(b, BODY_ID)
    return bytes(b)


def window_payload(index: int, position: int, moving: int = 0) -> bytes:
    """WindowStatus 0x3C8 (4 bytes): WindowIndex 0|2 (multiplexer), WindowPosition 8|7,
    WindowMoving 15|1."""
    return bytes([index, position | moving << 7, 0, 0])


def ambient_payload(temp: float, humidity_raw: int = 100) -> bytes:
    """AmbientConditions 0x18FF50E5: AmbientTemp IEEE-754 single little-endian, then humidity."""
    return struct.pack("<f", temp) + bytes([humidity_raw, 0, 0, 0])


def frame(can_id: int, data: bytes, t: float = 0.0, extended: bool | None = None,
          channel: str | None = "can0", **kw) -> can.Message:
    if extended is None:
        extended = can_id > 0x7FF
    return can.Message(timestamp=t, arbitration_id=can_id, is_extended_id=extended,
                       data=data, channel=channel, check=False, **kw)


def cluster(t: float, *args, **kw) -> can.Message:
    return frame(CLUSTER_ID, cluster_payload(*args, **kw), t)


def body(t: float, **kw) -> can.Message:
    return frame(BODY_ID, body_payload(**kw), t)


def window(t: float, index: int, position: int, moving: int = 0) -> can.Message:
    return frame(WINDOW_ID, window_payload(index, position, moving), t)


def ambient(t: float, temp: float) -> can.Message:
    return frame(AMBIENT_ID, ambient_payload(temp), t)


def published(decoder, updates) -> dict:
    """Decoder updates as {vss path: (value, quality)}."""
    return {decoder.paths[i]: (value, quality) for i, value, quality in updates}


#: Every character Python's str.splitlines() breaks at.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(message: str) -> bool:
    """True when ``message`` is one non-empty line: no line break of any kind anywhere (a
    trailing one included)."""
    return bool(message) and not any(c in message for c in LINE_BREAKS)


DBC_HEADER = 'VERSION ""\n\nNS_ :\n\tBA_DEF_\n\tBA_\n\tVAL_\n\nBS_:\n\nBU_: ECU\n\n'


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# Extended multiplexing (SG_MUL_VAL_): Page M; SubPage m1M under Page; FuelPct on Page 0;
# RangeKm on SubPage 2 (issue 16's reproducer).
EXT_DBC = DBC_HEADER + (
    "BO_ 1280 Info: 8 ECU\n"
    ' SG_ Page M : 0|4@1+ (1,0) [0|15] "" ECU\n'
    ' SG_ SubPage m1M : 4|4@1+ (1,0) [0|15] "" ECU\n'
    ' SG_ FuelPct m0 : 8|8@1+ (1,0) [0|100] "%" ECU\n'
    ' SG_ RangeKm m2 : 16|16@1+ (1,0) [0|1000] "km" ECU\n'
    ' SG_ Counter : 56|8@1+ (1,0) [0|255] "" ECU\n\n'
    'BA_DEF_ BO_ "GenMsgCycleTime" INT 0 10000;\n'
    'BA_ "GenMsgCycleTime" BO_ 1280 50;\n\n'
    "SG_MUL_VAL_ 1280 SubPage Page 1-1;\n"
    "SG_MUL_VAL_ 1280 FuelPct Page 0-0;\n"
    "SG_MUL_VAL_ 1280 RangeKm SubPage 2-2;\n"
)


# A small Vector ASC capture: two channels, an error frame, a malformed line, a 29-bit id.
ASC = """\
date Mon Jan 5 10:00:00.000 am 2026
base hex  timestamps absolute
internal events logged
// version 9.0.0
Begin Triggerblock Mon Jan 5 10:00:00.000 am 2026
   0.000000 Start of measurement
   0.010000 1  3D0             Rx   d 8 9C 80 15 70 00 00 00 71
   0.020000 2  2B0             Rx   d 8 00 0F 00 00 00 00 00 BF
   0.030000 1  ErrorFrame
   0.040000 1  3D0             Rx   d 8 9C 80 ZZ 70 00 00 00 71
   0.050000 2  18FF50E5x       Rx   d 8 00 00 AC 41 64 00 00 00
   0.060000 1  3D0             Rx   d 8 96 80 15 70 00 00 00 6B
End TriggerBlock
"""
