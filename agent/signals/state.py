"""The vehicle's latest known state: value, quality and time of every mapped signal.

:class:`SignalPipeline` joins the decoder and the state: frames go in, :class:`Change` objects
come out (a value or quality that differs from before), including signals going stale.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import can

from agent.can.keys import frame_key
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
        :class:`agent.can.source.Timeline`), so staleness keeps working after a bad timestamp;
        frames of ids nobody maps, and not due for a stale check, do not re-base it.
        """
        timeline = Timeline()
        keys = frozenset(self.decoder.frame_keys)
        for msg in frames:
            # The clock follows the frames the decoder uses (as run_capture's does): a frame
            # of an unmapped id that is not due for a check only moves with the offset.
            t = msg.timestamp + timeline.offset
            if (msg.is_error_frame or t >= self.next_check
                    or frame_key(msg.arbitration_id, msg.is_extended_id) in keys):
                t = timeline(msg.timestamp)
            msg.timestamp = t
            changes = self.feed(msg)
            if changes:
                yield from changes

    def run_capture(self, reader: "CaptureReader") -> Iterator[Change]:
        """The changes :meth:`run` finds in a capture, and the same counts; but the reader
        only counts the frames of ids the decoder does not map, and hands over just their
        timestamps when a stale check is due."""
        counters = self.decoder.counters
        before = reader.unwanted
        timeline = Timeline()
        clock = _CaptureClock(self, timeline)
        try:
            for item in reader.filtered(frozenset(self.decoder.frame_keys), clock):
                if item.__class__ is float:
                    # Due by its own timestamp; re-based (one that jumped ahead), maybe not.
                    t = timeline(item)
                    changes = self.tick(t) if t >= self.next_check else None
                else:
                    item.timestamp = timeline(item.timestamp)
                    changes = self.feed(item)
                if changes:
                    yield from changes
        finally:
            unmapped = reader.unwanted - before
            counters.frames += unmapped
            counters.unmapped += unmapped


class _CaptureClock:
    """The pipeline's clock as a capture reader sees it, in the capture's own timestamps.

    The pipeline runs on re-based time (:class:`Timeline`); the reader compares raw
    timestamps, so the next check is moved back by the timeline's offset. The timeline sees
    the frames the reader hands over (mapped ones, repeats, and those that reach a check):
    an unmapped frame whose timestamp goes back is skipped as any other, without re-basing.
    """

    __slots__ = ("pipeline", "timeline")

    def __init__(self, pipeline: SignalPipeline, timeline: Timeline) -> None:
        self.pipeline = pipeline
        self.timeline = timeline

    @property
    def next_check(self) -> float:
        return self.pipeline.next_check - self.timeline.offset

    def repeated(self, key: int, data: bytes, t: float) -> bool:
        return self.pipeline.repeated(key, data, self.timeline(t))
