"""What every capture reader offers."""

from __future__ import annotations

from pathlib import Path
import io
import math
from typing import IO, Callable, Iterator

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
_BLOCK = 64 * 1024             # characters read at a time (memory: one block and one line)
_BATCH = 512                   # lines per batch in line-by-line mode
# A batch's placeholder for an overlong line: one object, told apart by identity; made at run
# time so that no line read can be that object, and with no whitespace, so that a parser
# sees one field.
TOO_LONG = "".join(("\0", "too-long"))
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
HEX_CLASS = "[0-9A-Fa-f]"     # a hex digit in a regular expression


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


def text_blocks(handle: IO, limit: int) -> Iterator[str | list[str]]:
    """A text file's lines (opened with newline=""), a block of whole lines at a time (text
    ending in a newline, "\r\n" read as "\n"), while it has no lone carriage return and no
    line longer than a block; from the first of those on, lists of lines read line by line
    (with their line ends; TOO_LONG for one of ``limit`` characters or more, without its
    line end), as Python's text files split lines. Lines in blocks are not checked."""
    read = handle.read
    carry = text = ""
    while True:
        block = read(_BLOCK)
        text = carry + block if carry else block
        if not block:
            break                               # the last line, if it has no newline
        cut = text.rfind("\n") + 1
        whole = text[:cut]
        if "\r" in whole:
            if whole.count("\r") != whole.count("\r\n"):
                break
            whole = whole.replace("\r\n", "\n")
        carry = text[cut:]
        if whole:
            yield whole
        if len(carry) >= limit:
            text = carry
            break
    if text:
        yield from _line_batches(_readline_after(handle, text, limit), limit)


def _readline_after(handle: IO, pending: str, limit: int) -> Callable[[int], str]:
    """A readline over ``pending`` (read already, from a line's start) and then the rest
    of the file, splitting lines exactly as the file's own readline does."""
    if pending.endswith("\r"):
        pending += handle.read(1)                 # "\r\n" is one line end, not two
    if not pending.endswith(LINE_ENDS):
        rest = handle.readline(limit)             # the rest of the last line read
        pending += rest
        if len(rest) == limit and not rest.endswith(LINE_ENDS):
            skip_rest(handle.readline)            # overlong: dropped to its newline
            pending += "\n"
    head = io.StringIO(pending, newline="").readline
    tail = handle.readline

    def readline(size: int) -> str:
        return head(size) or tail(size)

    return readline


def _line_batches(readline: Callable[[int], str], limit: int) -> Iterator[list[str]]:
    while True:
        batch: list[str] = []
        for _ in range(_BATCH):
            line = readline(limit)      # bounded: memory never holds more than one short line
            if not line:
                break
            if len(line) == limit and not line.endswith(LINE_ENDS):
                skip_rest(readline)
                line = TOO_LONG
            batch.append(line)
        if batch:
            yield batch
        if len(batch) < _BATCH:
            return


# The width of a timestamp prefix's interval by its length from the dot ("1.2": 0.1 s), and a
# margin for the rounding of float().
_WIDTH = {2: 0.1, 3: 0.01}
_MARGIN = 1 + 1e-14


def prefix_bound(prefix: str) -> float:
    """A bound no timestamp written with ``prefix`` (seconds, a dot and one or two decimals:
    "1700000000.12") exceeds as a float: the block scans of the text readers look at the
    timestamps of a run of lines only when a check may be due below it."""
    return (float(prefix) + _WIDTH[len(prefix) - prefix.index(".")]) * _MARGIN


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
