"""The vehicle's latest known state: value, quality and time of every mapped signal.

:class:`SignalPipeline` joins the decoder and the state: frames go in, :class:`Change` objects
come out (a value or quality that differs from before), including signals going stale.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import can

from agent.can.source import Timeline
from agent.signals.decoder import Decoder
from agent.signals.model import STALE, Change

if TYPE_CHECKING:
    from agent.can.capture import CaptureReader

#: Stale checks run at most this often (seconds of the source's clock), not per frame.
STALE_CHECK_INTERVAL = 0.1


class VehicleState:
    """Latest value and quality per signal index; ``None`` quality = never received."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = paths
        n = len(paths)
        self.values: list[Any] = [None] * n
        self.qualities: list[str | None] = [None] * n
        self.received: list[float | None] = [None] * n   # last frame carrying the signal
        self.changed: list[float | None] = [None] * n    # last change of value or quality

    def apply(self, t: float, updates: Iterable[tuple[int, Any, str]]) -> list[Change]:
        changes = []
        values, qualities, received = self.values, self.qualities, self.received
        for index, value, quality in updates:
            received[index] = t
            if quality == qualities[index] and value == values[index] and (
                type(value) is type(values[index])
            ):
                continue
            values[index] = value
            qualities[index] = quality
            self.changed[index] = t
            changes.append(Change(t, self.paths[index], value, quality))
        return changes

    def mark_stale(self, t: float, indices: Iterable[int]) -> list[Change]:
        changes = []
        for index in indices:
            if self.qualities[index] == STALE:
                continue
            self.values[index] = None
            self.qualities[index] = STALE
            self.changed[index] = t
            changes.append(Change(t, self.paths[index], None, STALE))
        return changes

    def snapshot(self, now: float) -> dict[str, dict]:
        """Every mapped signal: value, quality and age in seconds (None if never received)."""
        out = {}
        for i, path in enumerate(self.paths):
            seen = self.received[i]
            out[path] = {
                "value": self.values[i],
                "quality": self.qualities[i] or STALE,
                "age": None if seen is None else round(max(0.0, now - seen), 3),
            }
        return out


class SignalPipeline:
    """Decoder + state: ``feed(frame)`` and ``tick(now)`` return the resulting changes."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.state = VehicleState(decoder.paths)
        self.next_check = -math.inf    # capture time of the next stale check
        self.repeated = decoder.repeated   # what a capture reader may skip (run_capture)

    def feed(self, msg: can.Message) -> list[Change]:
        t = msg.timestamp
        changes = self.tick(t) if t >= self.next_check else []
        updates = self.decoder.decode(msg)
        if updates:
            applied = self.state.apply(t, updates)
            if changes:
                changes.extend(applied)
                return changes
            return applied
        return changes

    def tick(self, now: float) -> list[Change]:
        """Mark signals stale whose frames stopped; call periodically when no frames arrive."""
        self.next_check = now + STALE_CHECK_INTERVAL
        expired = self.decoder.expired(now)
        return self.state.mark_stale(now, expired) if expired else []

    def run(self, frames: Iterable[can.Message]) -> Iterator[Change]:
        """All changes of a frame stream, in order (offline decoding).

        The capture's clock is re-based where it goes back or jumps ahead (see
        :class:`agent.can.source.Timeline`), so staleness keeps working after a bad timestamp.
        """
        for msg in Timeline().frames(frames):
            changes = self.feed(msg)
            if changes:
                yield from changes

    def run_capture(self, reader: "CaptureReader") -> Iterator[Change]:
        """The changes :meth:`run` finds in a capture, and the same counts; but the reader
        only counts the frames of ids the decoder does not map, and hands over just their
        timestamps when a stale check is due."""
        counters = self.decoder.counters
        before = reader.unwanted
        try:
            for item in reader.filtered(frozenset(self.decoder.frame_keys), self):
                changes = self.tick(item) if item.__class__ is float else self.feed(item)
                if changes:
                    yield from changes
        finally:
            unmapped = reader.unwanted - before
            counters.frames += unmapped
            counters.unmapped += unmapped
