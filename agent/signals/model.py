"""The signal model: which DBC signal feeds which COVESA VSS path, and how.

Plain data, no parsing and no decoding: :mod:`agent.mapping` builds it from YAML,
:mod:`agent.decode` binds it to a DBC and runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VALID = "valid"
INVALID = "invalid"
STALE = "stale"
QUALITIES = (VALID, INVALID, STALE)

#: A VSS path: "Vehicle" followed by dot-separated branch/leaf names.
VSS_PATH = re.compile(r"^Vehicle(\.[A-Za-z0-9][A-Za-z0-9_]*)+$")

#: VSS leaves (4.x) this project targets, with the datatype a mapping must produce.
#: Other valid-looking paths are accepted as they are (users map more than we know).
KNOWN_VSS = {
    "Vehicle.Powertrain.FuelSystem.RelativeLevel": "number",
    "Vehicle.Powertrain.FuelSystem.AbsoluteLevel": "number",
    "Vehicle.Powertrain.FuelSystem.Range": "number",
    "Vehicle.Powertrain.FuelSystem.IsFuelLevelLow": "bool",
    "Vehicle.Body.Trunk.Rear.IsOpen": "bool",
    "Vehicle.Body.Trunk.Front.IsOpen": "bool",
    "Vehicle.Body.Hood.IsOpen": "bool",
    "Vehicle.Cabin.Sunroof.Position": "number",
    "Vehicle.Exterior.AirTemperature": "number",
}
for _row in ("Row1", "Row2"):
    for _side in ("DriverSide", "PassengerSide"):
        KNOWN_VSS[f"Vehicle.Cabin.Door.{_row}.{_side}.IsOpen"] = "bool"
        KNOWN_VSS[f"Vehicle.Cabin.Door.{_row}.{_side}.IsLocked"] = "bool"
        KNOWN_VSS[f"Vehicle.Cabin.Door.{_row}.{_side}.Window.Position"] = "number"


@dataclass(frozen=True)
class SignalSpec:
    """One mapped signal: a DBC signal (optionally on one mux page) feeding one VSS path."""

    path: str
    message: str | int              # DBC message name, or frame id
    signal: str                     # DBC signal name
    scale: float = 1.0              # published = physical * scale + offset
    offset: float = 0.0
    invalid: tuple[int | float, ...] = ()       # raw values meaning "not available"
    values: tuple[tuple[str | int, Any], ...] | None = None  # value-table name/raw -> published
    mux: str | int | None = None    # multiplexer value (raw or value-table name) selecting the page
    timeout_ms: int | None = None   # stale after this long without a frame (default from cycle)
    decimals: int | None = None     # rounding of published numbers (default from resolution)


@dataclass(frozen=True)
class Mapping:
    """All mapped signals of one vehicle, in file order."""

    file: Path
    signals: tuple[SignalSpec, ...]
    stale_factor: float = 3.0       # stale after stale_factor x GenMsgCycleTime without a frame
    default_timeout_ms: int | None = None  # for messages without a cycle time; None = never stale


@dataclass(frozen=True, slots=True)
class Change:
    """A signal's value or quality changed at time ``t`` (seconds, the source's clock)."""

    t: float
    path: str
    value: Any
    quality: str

    def as_dict(self) -> dict:
        return {"t": self.t, "signal": self.path, "value": self.value, "quality": self.quality}
