"""Mapping files (YAML) -> :class:`agent.signals.Mapping`. No DBC knowledge here."""

from __future__ import annotations

import math
from pathlib import Path

from agent.schema import Section, describe, load_yaml
from agent.signals.model import KNOWN_VSS, VSS_PATH, Mapping, SignalSpec

SIGNAL_KEYS = ("message", "signal", "scale", "offset", "invalid", "values", "mux", "timeout_ms",
               "decimals")
PUBLISHED_TYPES = (bool, int, float, str)


def load_mapping(path: str | Path) -> Mapping:
    file = Path(path)
    top = Section(load_yaml(file, "mapping"), file)
    top.reject_unknown(("signals", "stale_factor", "default_timeout_ms"))
    signals = top.section("signals", required=True)
    if not signals.data:
        raise signals.error(None, "no signals mapped (expected at least one VSS path)")
    specs = []
    for vss_path in signals.data:
        if not isinstance(vss_path, str) or not VSS_PATH.fullmatch(vss_path):
            raise signals.error(str(vss_path), "not a VSS path (expected e.g. "
                                               "Vehicle.Powertrain.FuelSystem.Range)")
        specs.append(_signal(signals.section(vss_path, required=True), vss_path))
    return Mapping(
        file=file,
        signals=tuple(specs),
        stale_factor=float(top.number("stale_factor", 3.0, minimum=1.0)),
        default_timeout_ms=top.integer("default_timeout_ms", minimum=1),
    )


def _signal(s: Section, vss_path: str) -> SignalSpec:
    s.reject_unknown(SIGNAL_KEYS)
    message = s.get("message", (str, int), required=True)
    if isinstance(message, int) and not 0 <= message <= 0x1FFFFFFF:
        raise s.error("message", f"frame id {message:#x} is outside 0..0x1FFFFFFF")
    values = _values(s) if s.has("values") else None
    if KNOWN_VSS.get(vss_path) == "bool":
        if values is None:
            raise s.error("values", "missing: a boolean VSS signal needs `values` "
                                    "(e.g. {OPEN: true, CLOSED: false})")
        for key, published in values:
            if not isinstance(published, bool):
                raise s.error(f"values.{key}", f"expected true or false for a boolean VSS "
                                               f"signal, got {describe(published)}")
    mux = s.get("mux", (str, int))
    return SignalSpec(
        path=vss_path,
        message=message,
        signal=s.text("signal", required=True),
        scale=float(s.number("scale", 1.0)),
        offset=float(s.number("offset", 0.0)),
        invalid=_invalid(s),
        values=values,
        mux=mux,
        timeout_ms=s.integer("timeout_ms", minimum=1),
        decimals=s.integer("decimals", minimum=0, maximum=12),
    )


def _invalid(s: Section) -> tuple:
    raw = s.data.get("invalid")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raw = [raw]
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or (
            isinstance(item, float) and not math.isfinite(item)
        ):
            raise s.error(f"invalid[{i}]", f"expected a raw number, got {describe(item)}")
        out.append(item)
    return tuple(out)


def _values(s: Section) -> tuple:
    table = s.data["values"]
    if not isinstance(table, dict) or not table:
        raise s.error("values", f"expected a mapping of value-table names or raw integers to "
                                f"published values, got {describe(table)}")
    out = []
    for key, published in table.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise s.error(f"values.{key}", "expected a value-table name or raw integer as key")
        if not isinstance(published, PUBLISHED_TYPES) or (
            isinstance(published, float) and not math.isfinite(published)
        ):
            raise s.error(f"values.{key}", f"expected a boolean, number or string, "
                                           f"got {describe(published)}")
        out.append((key, published))
    return tuple(out)
