"""What every capture reader offers."""

from __future__ import annotations

from pathlib import Path
import math
from typing import IO, Iterator

import can

from agent.can.keys import EXTENDED_KEY

#: How many malformed line numbers a reader remembers to show the user.
FIRST_MALFORMED = 5
#: Longest text line read whole (a CAN FD frame in ASC is ~400 characters); a longer one is
#: skipped to its newline in chunks, so memory is bounded by this, not by the file's lines.
MAX_LINE = 4096
_SKIP_CHUNK = 64 * 1024
_FORMAT_NAMES = {"candump": "candump -L", "asc": "Vector ASC", "blf": "Vector BLF",
                 "trc": "PEAK TRC"}
LINE_ENDS = ("\n", "\r")
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def read_line(readline, limit: int = MAX_LINE) -> str | None:
    """The next line from ``readline`` (a text file's), "" at the end of the file, or None for
    a line longer than ``limit``, whose rest is read and dropped chunk by chunk."""
    line = readline(limit + 1)
    if len(line) <= limit or line.endswith(LINE_ENDS):
        return line
    skip_rest(readline)
    return None


def skip_rest(readline) -> None:
    """Read and drop the rest of an overlong line, up to and including its newline."""
    while True:
        rest = readline(_SKIP_CHUNK)
        if not rest or rest.endswith(LINE_ENDS):
            return


def finite(timestamp: float) -> bool:
    """A timestamp that can be published: NaN and infinities are not JSON and order nothing."""
    return math.isfinite(timestamp)


class Clock:
    """What :meth:`CaptureReader.filtered` asks of its consumer: the capture time at which it
    wants to hear of a frame it does not otherwise want (its periodic checks are due), and
    whether a data frame of a wanted id repeats what it already has (then it is not handed
    over)."""

    next_check: float

    def repeated(self, key: int, data: bytes, t: float) -> bool:
        """True: the frame (key, payload, time) was taken as a repeat and counted."""
        raise NotImplementedError


class CaptureReader:
    """Iterates a capture's frames as :class:`can.Message`, counting what it had to skip."""

    format = "?"

    def __init__(self, path: Path, handle: IO, channel: str | None) -> None:
        self.path = path
        self.handle = handle
        self.channel = channel
        self.frames = 0
        self.other_channel = 0
        self.malformed = 0
        self.first_malformed: list[tuple[int, str]] = []   # (line number or -1, reason)
        self.error: str | None = None                      # a fatal read error, if any
        self.not_a_capture = False    # nothing in the file looked like this format at all
        self.unwanted = 0             # frames `filtered` counted and did not hand over

    def __iter__(self) -> Iterator[can.Message]:
        raise NotImplementedError

    def filtered(self, keys: frozenset[int], clock: Clock) -> Iterator["can.Message | float"]:
        """The frames whose key (id, | EXTENDED_KEY for 29-bit ids) is in ``keys``, and error
        frames; any other frame is counted in :attr:`unwanted` and, when its timestamp reaches
        ``clock.next_check``, yielded as that timestamp (a float), so that the consumer's
        periodic checks run as they would with every frame. Readers override it to skip the
        work of converting the frames nobody wants."""
        for msg in self:
            if msg.is_error_frame or (msg.arbitration_id | EXTENDED_KEY if msg.is_extended_id
                                      else msg.arbitration_id) in keys:
                yield msg
                continue
            self.unwanted += 1
            if msg.timestamp >= clock.next_check:
                yield msg.timestamp

    def _not_a_capture(self, detail: str) -> None:
        self.error = f"not a capture file (expected {_FORMAT_NAMES[self.format]}: {detail})"
        self.not_a_capture = True

    def _bad(self, line: int, reason: str) -> None:
        self.malformed += 1
        if len(self.first_malformed) < FIRST_MALFORMED:
            self.first_malformed.append((line, reason))

    def malformed_summary(self) -> str | None:
        """One line for stderr, or None when every line was fine."""
        parts = []
        if self.malformed:
            where = ", ".join(
                f"line {n} ({why})" if n >= 0 else why for n, why in self.first_malformed
            )
            more = ", ..." if self.malformed > len(self.first_malformed) else ""
            parts.append(f"{self.malformed} malformed line(s) skipped: {where}{more}")
        if self.error:
            parts.append(self.error)
        return f"{self.path}: {'; '.join(parts)}" if parts else None

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass

    def __enter__(self) -> "CaptureReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
