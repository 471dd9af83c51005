"""Frame keys: one int per frame identity, so that the hot path looks ids up without tuples."""

from __future__ import annotations

EXTENDED_KEY = 0x80000000   # frame key = id | EXTENDED_KEY for 29-bit ids


def frame_key(frame_id: int, extended: bool) -> int:
    return frame_id | EXTENDED_KEY if extended else frame_id
