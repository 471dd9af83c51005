"""Raw signal values out of a CAN payload: what cantools' decode gives with choices and scaling
off, for a group of DBC signals, precomputed into shifts and masks.

Our own rather than cantools' codec so that a built decoder holds no cantools object: the daemon
has its decoder built in a short-lived start-up process that loaded the DBC files (see
:func:`agent.signals.vehicle.compile_decoder`), gets it pickled, and never imports cantools
itself. ``tests/test_decode_opendbc.py`` checks it against cantools on every message of every
DBC we have.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

_FLOAT_FORMATS = {16: "<e", 32: "<f", 64: "<d"}


@dataclass(frozen=True)
class SignalLayout:
    """Where a signal's raw value sits in a payload, as a DBC ``SG_`` line says."""

    name: str
    start: int                  # DBC start bit (Motorola: its most significant bit)
    length: int
    little_endian: bool
    signed: bool
    is_float: bool

    @classmethod
    def of(cls, signal: Any) -> SignalLayout:
        """The layout of a cantools ``Signal``."""
        return cls(signal.name, signal.start, signal.length,
                   signal.byte_order == "little_endian", bool(signal.is_signed),
                   bool(signal.is_float))


class RawDecoder:
    """``decoder(payload)`` -> ``{signal name: raw value}`` for a payload of at least ``size``
    bytes (the message's DBC length; extra bytes of a larger CAN FD frame are ignored, as
    cantools does). Raises ValueError for a shorter payload."""

    __slots__ = ("size", "fields", "little", "big")

    def __init__(self, layouts: list[SignalLayout] | tuple[SignalLayout, ...], size: int) -> None:
        fields = []
        for layout in layouts:
            if layout.is_float and layout.length not in _FLOAT_FORMATS:
                raise ValueError(f"signal {layout.name}: a float of {layout.length} bits")
            if layout.little_endian:
                shift = layout.start
            else:   # Motorola: count from the payload's first (most significant) bit
                msb = 8 * (layout.start // 8) + 7 - layout.start % 8
                shift = 8 * size - msb - layout.length
            if shift < 0 or shift + layout.length > 8 * size:
                raise ValueError(f"signal {layout.name} ({layout.start}|{layout.length}) does "
                                 f"not fit in {size} bytes")
            sign = 1 << (layout.length - 1) if layout.signed and not layout.is_float else 0
            fmt = _FLOAT_FORMATS[layout.length] if layout.is_float else None
            fields.append((layout.name, layout.little_endian, shift, (1 << layout.length) - 1,
                           sign, fmt))
        self.size = size
        self.fields = tuple(fields)
        self.little = any(f[1] for f in fields)
        self.big = any(not f[1] for f in fields)

    def __call__(self, payload: bytes) -> dict[str, int | float]:
        size = self.size
        if len(payload) != size:
            if len(payload) < size:
                raise ValueError(f"{len(payload)} bytes, {size} expected")
            payload = payload[:size]
        little = int.from_bytes(payload, "little") if self.little else 0
        big = int.from_bytes(payload, "big") if self.big else 0
        out: dict[str, int | float] = {}
        for name, is_little, shift, mask, sign, fmt in self.fields:
            raw = ((little if is_little else big) >> shift) & mask
            if fmt is not None:
                out[name] = struct.unpack(fmt, raw.to_bytes(struct.calcsize(fmt), "little"))[0]
            elif raw & sign:
                out[name] = raw - (sign << 1)
            else:
                out[name] = raw
        return out
