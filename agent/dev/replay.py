"""``car-agent replay``: play a capture onto a CAN bus (SocketCAN vcan by default).

Streams the capture (memory does not grow with it) and keeps its timing against a monotonic
clock: each frame is due at ``start + (t - t0) / speed``, computed from the capture's own
timestamps, so errors do not accumulate over long captures and there is no frame-rate cap.
Optional fault injection (drop, jitter, gaps for one id, a flood of unrelated ids) lets tests
show how the agent behaves under each.
"""

from __future__ import annotations

import errno
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

import can
from can.interfaces.socketcan.socketcan import SocketcanBus, build_can_frame

from agent.can.capture import open_capture
from agent.errors import UserError
from agent.can.source import socketcan_hint

log = logging.getLogger("car_agent.replay")

#: How long a full transmit queue may stay full before the replay gives up.
TX_FULL_GIVE_UP_S = 2.0
#: Sleep only when a frame is due later than this; closer frames are sent at once.
SLEEP_THRESHOLD_S = 0.0005
#: A jump of the capture's clock between two frames larger than this (forward: a far-future
#: timestamp, a logger's clock step; or backward) is not waited for: the timing re-bases on
#: the frame after it, with a warning, instead of sleeping for days or raising OverflowError.
MAX_JUMP_S = 60.0
TIMING_SAMPLES = 20_000


@dataclass(frozen=True)
class Gap:
    """Withhold frames of ``frame_id`` from capture second ``start`` for ``duration`` seconds."""

    frame_id: int
    start: float
    duration: float


@dataclass(frozen=True)
class Flood:
    """Inject ``rate`` frames/s of random unrelated ids from ``start`` for ``duration`` s."""

    rate: float
    start: float = 0.0
    duration: float = float("inf")


@dataclass(frozen=True)
class ReplayOptions:
    channel: str = "vcan0"
    interface: str = "socketcan"
    speed: float = 1.0
    timing: bool = True
    loops: int = 1
    ids: frozenset[int] | None = None
    start: float | None = None
    end: float | None = None
    channel_map: tuple[tuple[str, str], ...] = ()
    capture_format: str | None = None
    fd: bool = True
    drop: float = 0.0
    jitter_s: float = 0.0
    gaps: tuple[Gap, ...] = ()
    flood: Flood | None = None
    seed: int = 1


@dataclass
class ReplaySummary:
    sent: int = 0
    skipped: int = 0
    error_frames: int = 0
    dropped: int = 0
    withheld: int = 0
    flooded: int = 0
    errors: int = 0
    malformed: int = 0
    jumps: int = 0
    wall_s: float = 0.0
    late: list[float] = field(default_factory=list)   # sampled |actual - due|, seconds

    def percentile(self, q: float) -> float | None:
        if not self.late:
            return None
        ordered = sorted(self.late)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def line(self) -> str:
        rate = self.sent / self.wall_s if self.wall_s > 0 else 0.0
        parts = [f"{self.sent} frames sent in {self.wall_s:.2f} s ({rate:.0f} frames/s)",
                 f"{self.skipped} skipped", f"{self.error_frames} error frames skipped",
                 f"{self.errors} send errors"]
        if self.malformed:
            parts.append(f"{self.malformed} malformed lines")
        if self.jumps:
            parts.append(f"{self.jumps} clock jump(s) over {MAX_JUMP_S:g} s not waited for")
        if self.dropped or self.withheld or self.flooded:
            parts.append(f"faults: {self.dropped} dropped, {self.withheld} withheld, "
                         f"{self.flooded} flood frames")
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        if p50 is not None:
            parts.append(f"timing error p50 {p50 * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms")
        return "replay: " + ", ".join(parts)


def parse_ids(text: str) -> frozenset[int]:
    ids = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part, 16)   # frame ids are hex, with or without 0x
        except ValueError:
            raise UserError(f"--ids: {part!r} is not a hex frame id (e.g. 0x123)") from None
        if not 0 <= value <= 0x1FFFFFFF:
            raise UserError(f"--ids: {part} is outside 0..0x1FFFFFFF")
        ids.add(value)
    return frozenset(ids)


def parse_map(items: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise UserError(f"--map: {item!r} is not SOURCE=TARGET (e.g. can0=vcan0)")
        pairs.append((source, target))
    return tuple(pairs)


def parse_gap(text: str) -> Gap:
    try:
        ident, start, duration = text.split(":")
        return Gap(int(ident, 16), float(start), float(duration))
    except ValueError:
        raise UserError(f"--gap: {text!r} is not ID:START:DURATION (e.g. 0x3D0:10:2)") from None


def parse_flood(text: str) -> Flood:
    parts = text.split(":")
    try:
        if len(parts) in (1, 3):
            flood = Flood(*(float(p) for p in parts))
            if not 0 < flood.rate < float("inf"):
                raise UserError(f"--flood: RATE must be a positive number of frames/s, "
                                f"got {parts[0]!r}")
            if not (flood.duration >= 0 and flood.start >= 0):
                raise UserError(f"--flood: START and DURATION must not be negative: {text!r}")
            return flood
    except ValueError:
        pass
    raise UserError(f"--flood: {text!r} is not RATE or RATE:START:DURATION (e.g. 3000:5:2)")


class _Buses:
    """The target bus(es): one per distinct target channel, opened on first use."""

    def __init__(self, options: ReplayOptions) -> None:
        self.options = options
        self.mapping = dict(options.channel_map)
        self.buses: dict[str, can.BusABC] = {}

    def for_channel(self, source_channel: str | None) -> can.BusABC | None:
        if self.mapping:
            target = self.mapping.get(str(source_channel))
            if target is None:
                return None
        else:
            target = self.options.channel
        bus = self.buses.get(target)
        if bus is None:
            bus = self.buses[target] = self._open(target)
        return bus

    def default(self) -> can.BusABC:
        """Where injected frames go: the first mapped target, else ``--channel``."""
        target = next(iter(self.mapping.values()), self.options.channel)
        bus = self.buses.get(target)
        if bus is None:
            bus = self.buses[target] = self._open(target)
        return bus

    def _open(self, channel: str) -> can.BusABC:
        kwargs = {"interface": self.options.interface, "channel": channel}
        if self.options.fd:
            kwargs["fd"] = True
        if self.options.interface == "socketcan":
            # The replay is a sender: it must not see its own frames again.
            kwargs["receive_own_messages"] = False
        try:
            return can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError, ImportError, NotImplementedError) as exc:
            raise UserError(f"cannot open {self.options.interface} {channel}: {exc}"
                            f"{socketcan_hint(exc, channel)}") from None

    def close(self) -> None:
        for bus in self.buses.values():
            try:
                bus.shutdown()
            except Exception:  # noqa: BLE001
                pass


_SENT, _RETRY, _FAILED = 1, 0, -1


def _sender(bus: can.BusABC, summary: ReplaySummary) -> Callable[[can.Message], None]:
    """A function sending one frame, counting it, retrying while the TX queue is full.

    On SocketCAN the frame goes straight to the raw socket: python-can's ``send`` adds a
    select() per frame, which halves the achievable rate where system calls are expensive.
    """
    sock = getattr(bus, "socket", None)
    if isinstance(bus, SocketcanBus) and sock is not None:
        def attempt(msg: can.Message) -> int:
            try:
                sock.send(build_can_frame(msg))
                return _SENT
            except BlockingIOError:
                return _RETRY
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return _RETRY
                _send_failed(exc, summary)
                return _FAILED
    else:
        def attempt(msg: can.Message) -> int:
            try:
                bus.send(msg, timeout=0.1)
                return _SENT
            except can.CanOperationError as exc:
                text = str(exc).lower()
                if "buffer" in text or "timed out" in text:
                    return _RETRY
                _send_failed(exc, summary)
                return _FAILED

    def send(msg: can.Message) -> None:
        deadline = None
        while (outcome := attempt(msg)) == _RETRY:
            now = time.monotonic()
            deadline = deadline or now + TX_FULL_GIVE_UP_S
            if now >= deadline:
                raise UserError(f"transmit queue full for {TX_FULL_GIVE_UP_S:g} s: the bus "
                                "does not take frames")
            time.sleep(0.001)
        if outcome == _SENT:
            summary.sent += 1
    return send


def _send_failed(exc: Exception, summary: ReplaySummary) -> None:
    text = str(exc).lower()
    if "network is down" in text or "no such device" in text:
        raise UserError(f"bus went away: {exc}") from None
    summary.errors += 1
    if summary.errors in (1, 10, 100, 1000):
        log.warning("replay: send error (%d so far): %s", summary.errors, exc)


def _flood_frames(flood: Flood, rng: random.Random, t0: float) -> Iterator[tuple[float, can.Message]]:
    """Random unrelated ids (0x700-0x7EF) at ``rate`` frames/s, as (capture time, frame)."""
    period = 1.0 / flood.rate
    t = flood.start
    end = flood.start + flood.duration
    while t < end:
        yield t0 + t, can.Message(arbitration_id=rng.randrange(0x700, 0x7F0), is_extended_id=False,
                                  data=rng.randbytes(8))
        t += period


def replay(capture: Path, options: ReplayOptions,
           progress: Callable[[int, float, float | None], None] | None = None,
           stop: Callable[[], bool] | None = None) -> ReplaySummary:
    """Play ``capture`` onto the bus; returns what happened. Raises UserError on fatal errors."""
    summary = ReplaySummary()
    rng = random.Random(options.seed)
    buses = _Buses(options)
    total = progress_total(capture_span(capture), options)
    sample_every = 1
    senders: dict[int, Callable[[can.Message], None]] = {}
    now = 0.0
    started = time.monotonic()
    last_progress = started
    clock0: float | None = None     # monotonic time of capture time t0
    t0: float | None = None         # capture time of the first frame played
    offset = 0.0                    # capture-time offset of the current loop
    skipped_s = 0.0                 # capture time not waited for (clock jumps)
    previous_t: float | None = None
    try:
        for loop in range(max(1, options.loops)):
            with open_capture(capture, options.capture_format) as reader:
                first = None                    # the capture's first frame: 0 s for the window
                win_first = win_last = None     # first and last frame played in the window
                played = 0
                stopped = False
                frames = _merge_flood(iter(reader), options, rng) if options.flood else (
                    (None, m) for m in reader)
                for injected, msg in frames:
                    if stop is not None and stop():
                        stopped = True
                        break
                    ts = msg.timestamp if injected is None else injected
                    if first is None:
                        first = ts
                    rel = round(ts - first, 6)      # microseconds: predictable window edges
                    if options.start is not None and rel < options.start:
                        summary.skipped += 1
                        continue
                    if options.end is not None and rel > options.end:
                        break
                    if injected is None:
                        if msg.is_error_frame:
                            summary.error_frames += 1
                            continue
                        if options.ids is not None and msg.arbitration_id not in options.ids:
                            summary.skipped += 1
                            continue
                        if options.drop and rng.random() < options.drop:
                            summary.dropped += 1
                            continue
                        if options.gaps and any(
                            g.frame_id == msg.arbitration_id and g.start <= rel < g.start + g.duration
                            for g in options.gaps
                        ):
                            summary.withheld += 1
                            continue
                    bus = buses.for_channel(msg.channel) if injected is None \
                        else buses.default()
                    if bus is None:
                        summary.skipped += 1
                        continue
                    if win_first is None:
                        win_first = ts
                    win_last = ts
                    played += 1
                    t = ts + offset
                    if t0 is None:
                        t0 = t
                        clock0 = now = time.monotonic()
                    if previous_t is not None and abs(t - previous_t) > MAX_JUMP_S:
                        skipped_s += t - previous_t
                        summary.jumps += 1
                        if summary.jumps <= 3:
                            log.warning("replay: %s: the capture's clock jumps by %.6g s before "
                                        "frame %d of loop %d; sent without waiting", capture,
                                        t - previous_t, played, loop + 1)
                    previous_t = t
                    if options.timing:
                        due = clock0 + (t - t0 - skipped_s) / options.speed
                        if options.jitter_s:
                            due += rng.uniform(-options.jitter_s, options.jitter_s)
                        # Read the clock only when this frame may be early: each read is a
                        # system call where there is no vDSO (User-Mode Linux).
                        if due > now:
                            now = time.monotonic()
                            if due - now > SLEEP_THRESHOLD_S:
                                time.sleep(due - now)
                                now = time.monotonic()
                        if summary.sent % sample_every == 0:
                            now = time.monotonic()
                            summary.late.append(abs(now - due))
                            if len(summary.late) >= TIMING_SAMPLES:
                                summary.late = summary.late[::2]
                                sample_every *= 2
                    if injected is not None:
                        summary.flooded += 1
                    send = senders.get(id(bus))
                    if send is None:
                        send = senders[id(bus)] = _sender(bus, summary)
                    send(msg)
                    if progress is not None:
                        now = time.monotonic()
                        if now - last_progress >= 0.25:
                            last_progress = now
                            progress(summary.sent, t - t0 - skipped_s, total)
                summary.malformed += reader.malformed
                if stopped:
                    return summary
                if reader.error:
                    raise UserError(f"{capture}: {reader.error}")
                if loop == 0 and summary.malformed:
                    note = reader.malformed_summary()
                    if note:
                        print(note, file=sys.stderr)
                if win_first is not None:
                    # The next loop starts one mean frame gap after this loop's last frame.
                    length = win_last - win_first
                    offset += length + length / max(1, played - 1)
        if progress is not None and t0 is not None:
            progress(summary.sent, previous_t - t0 - skipped_s, total)   # the final state
        return summary
    finally:
        summary.wall_s = time.monotonic() - started
        buses.close()


def _merge_flood(frames: Iterator[can.Message], options: ReplayOptions,
                 rng: random.Random) -> Iterator[tuple[float | None, can.Message]]:
    """The capture's frames with flood frames merged in by time."""
    first = next(frames, None)
    if first is None:
        return
    flood = _flood_frames(options.flood, rng, first.timestamp)
    pending = next(flood, None)
    for msg in _chain(first, frames):
        while pending is not None and pending[0] <= msg.timestamp:
            yield pending
            pending = next(flood, None)
        yield None, msg


def _chain(first: can.Message, rest: Iterator[can.Message]) -> Iterator[can.Message]:
    yield first
    yield from rest


def progress_total(span: float | None, options: ReplayOptions) -> float | None:
    """Capture seconds the replay will play: the ``--start``/``--end`` window of ``span``
    (seconds from the first to the last frame), once per loop; None if the span is unknown."""
    if span is None:
        return None
    start = max(0.0, options.start or 0.0)
    end = span if options.end is None else min(span, options.end)
    return max(0.0, end - start) * max(1, options.loops)


def capture_span(path: Path) -> float | None:
    """Seconds from the first to the last frame of an uncompressed candump file (else None)."""
    if path.suffix.lower() != ".log":
        return None
    try:
        with open(path, "rb") as f:
            head = f.readline()
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().splitlines()
        first = float(head.split()[0][1:-1])
        last = next(float(line.split()[0][1:-1]) for line in reversed(tail)
                    if line.strip().startswith(b"("))
        return max(0.0, last - first)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def terminal_progress(stream: TextIO = sys.stderr) -> Callable[[int, float, float | None], None]:
    def show(sent: int, elapsed: float, total: float | None) -> None:
        of = f"/{total:.1f} s ({100 * elapsed / total:3.0f} %)" if total else " s"
        stream.write(f"\rreplay: {sent} frames, {elapsed:.1f}{of}   ")
        stream.flush()
    return show
