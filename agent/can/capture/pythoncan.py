"""ASC, TRC and BLF through python-can's readers, made resilient and line-aware.

python-can's text readers end the whole iteration at the first line they cannot parse. We feed
them through a line-counting file wrapper and, when one raises, record the line and resume a
copy of the reader (header state kept) on the rest of the file, so one bad line costs one frame.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import zlib
from typing import IO, Callable, Iterator

import can

from .base import EXTENDED_KEY, HEX_CLASS, HEX_DIGITS, MAX_LINE, TOO_LONG, CaptureReader, \
    Clock, finite, prefix_bound, text_blocks

# python-can's text readers log a warning per line they cannot parse; we count and report
# those lines ourselves (once, with line numbers), so their per-line warnings are noise.
logging.getLogger("can.io.trc").setLevel(logging.ERROR)
logging.getLogger("can.io.asc").setLevel(logging.ERROR)

_READERS = {"asc": can.ASCReader, "trc": can.TRCReader, "blf": can.BLFReader}
# Vector tools number channels from 1; python-can reports them from 0.
_ONE_BASED = frozenset(("asc", "blf"))
# Lines only a capture of that format has (its header): a file with neither these nor a
# single frame is not a capture, whatever its name says.
_HEADER_MARKS = {"asc": ("date ", "base ", "begin triggerblock", "internal events logged",
                         "no internal events logged", "// version"),
                 "trc": (";",)}
_HEADER_LINES = 100


class _CountingLines:
    """A text file that counts the lines handed out, and ends (remembering why) where the file
    cannot be read any further (a truncated or corrupt .gz), instead of raising into python-can,
    which would take it for one bad line and try again forever. Read a block at a time
    (:func:`text_blocks`): a consumer may take runs of lines out of a block (``scan``)."""

    def __init__(self, handle: IO, too_long: Callable[[int], None],
                 marks: tuple[str, ...]) -> None:
        self.handle = handle
        self.number = 0
        self.failed: Exception | None = None
        self.too_long = too_long    # called with the number of a line too long to read
        self.marks = marks
        self.header_seen = False    # a line of the format's header among the first lines
        # A line the consumer does not want, taken out before python-can parses it (True).
        self.skip: Callable[[str], bool] | None = None
        # Called before a line of a block is handed out: may move ``pos`` past lines the
        # consumer does not want (counting them in ``number``).
        self.scan: Callable[[], None] | None = None
        self._chunks = text_blocks(handle, MAX_LINE + 1)
        self.chunk: str | list[str] = ""   # the block (str) or batch of lines being read
        self.pos = 0                       # where in it the next line starts

    def __iter__(self) -> "_CountingLines":
        return self

    def __next__(self) -> str:
        scan, skip = self.scan, self.skip
        while True:
            if scan is not None and self.pos < len(self.chunk) and self.chunk.__class__ is str:
                scan()
            line = self.readline()
            if not line:
                raise StopIteration
            if skip is None or not skip(line):
                return line

    def readline(self) -> str:
        if self.pos >= len(self.chunk):
            if self.failed is not None:
                return ""
            try:
                self.chunk = next(self._chunks, "")
            except (OSError, EOFError, zlib.error) as exc:
                self.failed = exc
                self.chunk = ""
            self.pos = 0
            if not self.chunk:
                return ""
        chunk, pos = self.chunk, self.pos
        if chunk.__class__ is str:
            self.pos = chunk.index("\n", pos) + 1
            line = chunk[pos:self.pos] if self.pos - pos <= MAX_LINE + 1 else TOO_LONG
        else:
            line = chunk[pos]
            self.pos = pos + 1
        self.number += 1
        if line is TOO_LONG:
            self.too_long(self.number)
            return "\n"    # an empty line: python-can's readers skip it
        if not self.header_seen and self.number <= _HEADER_LINES:
            self.header_seen = line.lstrip().lower().startswith(self.marks)
        return line

    def close(self) -> None:
        self.handle.close()


class PythonCanReader(CaptureReader):
    def __init__(self, path, handle, fmt: str, channel: str | None) -> None:
        super().__init__(path, handle, channel)
        self.format = fmt
        self._lines: _CountingLines | None = None   # text formats: where the reader is
        self._parsed = 0                             # frames python-can made of the file
        self._unwanted_asc: _AscFilter | None = None  # ASC lines `filtered` takes out

    def _position(self) -> int:
        """The line being read (text formats), or -1 where there are no lines (BLF)."""
        return -1 if self._lines is None else self._lines.number

    def __iter__(self) -> Iterator[can.Message]:
        if self.format == "blf":
            yield from self._frames(self._blf())
        else:
            yield from self._frames(self._text())

    def filtered(self, keys: frozenset[int], clock: Clock) -> Iterator[can.Message | float]:
        if self.format == "asc":
            self._unwanted_asc = _AscFilter(self, keys, clock)
        yield from super().filtered(keys, clock)

    def _frames(self, messages: Iterator[can.Message]) -> Iterator[can.Message]:
        want = self.channel
        one_based = self.format in _ONE_BASED
        for msg in messages:
            self._parsed += 1
            if not finite(msg.timestamp):
                self._bad(self._position(), "bad timestamp")
                continue
            chan = msg.channel
            if isinstance(chan, int):
                msg.channel = str(chan + 1 if one_based else chan)
            elif chan is None:
                msg.channel = "1" if one_based else "0"
            if want is not None and msg.channel != want:
                self.other_channel += 1
                continue
            self.frames += 1
            yield msg

    def _text(self) -> Iterator[can.Message]:
        lines = self._lines = _CountingLines(
            self.handle, lambda number: self._bad(number, "line too long"),
            _HEADER_MARKS[self.format])
        try:
            # Absolute timestamps (from the ASC header's date) like candump's, not from 0.
            kwargs = {"relative_timestamp": False} if self.format == "asc" else {}
            reader = _READERS[self.format](lines, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._not_a_capture(str(exc)[:80] or type(exc).__name__)
            return
        iterator = iter(reader)
        wanted = self._unwanted_asc
        while True:
            try:
                msg = next(iterator)
            except StopIteration:
                if lines.failed is not None:
                    self.error = f"unreadable after line {lines.number}: {lines.failed}"
                elif not self._parsed and not lines.header_seen and lines.number:
                    self._not_a_capture(f"no {self.format.upper()} header and no frame in "
                                        f"{lines.number} line(s)")
                return
            except Exception as exc:  # noqa: BLE001 - python-can raises ValueError, IndexError...
                if self.frames == 0 and self.malformed == 0 and str(exc).startswith("File has no"):
                    # A header problem (TRC without $STARTTIME/$COLUMNS): nothing after it parses.
                    self._not_a_capture(str(exc)[:80])
                    return
                self._bad(lines.number, type(exc).__name__ if not str(exc) else str(exc)[:60])
                resumed = copy.copy(reader)
                resumed._extract_header = lambda: None  # the header was read already
                reader = resumed
                iterator = iter(resumed)
                continue
            if wanted is not None and lines.skip is None:
                # From python-can's first frame on (its header is read): its reader's state
                # (start time, base) is known and no header line can be taken for a frame.
                lines.skip = lambda line: wanted.skips(line, reader)
                lines.scan = lambda: wanted.skip_run(lines, reader)
            yield msg

    def _blf(self) -> Iterator[can.Message]:
        compressed = self.path.name.lower().endswith(".gz")
        actual = None if compressed else os.fstat(self.handle.fileno()).st_size
        try:
            reader = can.BLFReader(self.handle)
        except Exception as exc:  # noqa: BLE001 - no BLF signature/header: not a BLF file
            self._not_a_capture(str(exc)[:80] or type(exc).__name__)
            return
        try:
            yield from reader
            # python-can stops quietly at a truncated file; the header knows the real size.
            expected = getattr(reader, "file_size", None)
            if actual is not None and expected:
                if actual < expected:
                    self.error = (f"BLF file truncated ({actual} of {expected} bytes) after "
                                  f"{self.frames} frame(s)")
        except Exception as exc:  # noqa: BLE001 - a truncated/corrupt binary file cannot resume
            self.error = f"BLF data unreadable after {self.frames} frame(s): {str(exc)[:80]}"


_DLC_LENGTHS = {f"{dlc:X}": length for dlc, length in
                enumerate((0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64))}
_DLC_LENGTHS.update({text.lower(): length for text, length in _DLC_LENGTHS.items()})


class _AscFilter:
    """Which Vector ASC lines are frames of an unwanted id that python-can's ASCReader would
    read without error (checked as its regex, splits and int() conversions do), counted here
    instead of parsed: a classic data frame in base hex. Anything else (error, remote and CAN
    FD frames, base dec, events, a line in doubt) is left to python-can, as is a frame whose
    timestamp reaches the clock's next check."""

    def __init__(self, owner: PythonCanReader, keys: frozenset[int], clock: Clock) -> None:
        self.owner = owner
        self.keys = keys
        self.clock = clock
        self.want = owner.channel
        self.runs = _asc_runs(keys, owner.channel).match

    def skip_run(self, lines: _CountingLines, reader) -> None:
        """Takes the lines :meth:`skips` would take, one by one, a run at a time: those
        :func:`_asc_runs` finds at the position in a block, up to the first that reaches the
        clock's next check."""
        if reader.base != "hex":
            return
        text, pos = lines.chunk, lines.pos
        start = reader.start_time
        check = self.clock.next_check
        count = 0
        while run := self.runs(text, pos):
            end = run.end()
            if check > prefix_bound(run.group(1)) + start:
                count += text.count("\n", pos, end)
                pos = end
                continue
            for stamp in _ASC_STAMP.findall(text, pos, end):
                if not float(stamp) + start < check:
                    break                   # python-can reads it: the check is due
                count += 1
                pos = text.index("\n", pos) + 1
            if pos < end:
                break
        lines.pos = pos
        lines.number += count
        owner = self.owner
        owner._parsed += count
        owner.frames += count
        owner.unwanted += count

    def skips(self, line: str, reader) -> bool:
        if not line.isascii():
            return False
        parts = line.split()
        if len(parts) < 6 or parts[4] not in ("d", "D") or reader.base != "hex":
            return False
        stamp, chan, ident, direction, _, dlc = parts[:6]
        length = _DLC_LENGTHS.get(dlc)
        if length is None or direction.lower() not in ("rx", "tx") or not chan.isdigit():
            return False
        whole, dot, decimals = stamp.partition(".")
        if not (dot and whole.isdigit() and decimals.isdigit()) or len(stamp) > 300:
            return False
        extended = ident[-1:] in ("x", "X")
        digits = ident[:-1] if extended else ident
        if not digits or not HEX_DIGITS.issuperset(digits):
            return False
        key = int(digits, 16) | EXTENDED_KEY if extended else int(digits, 16)
        if key in self.keys:
            return False
        data = parts[6:6 + min(8, length)]
        try:
            if len(bytes.fromhex(" ".join(data))) != len(data):
                return False
        except ValueError:
            return False
        if self.want is not None and str(int(chan)) != self.want:
            return False
        t = float(stamp) + reader.start_time
        if not finite(t) or t >= self.clock.next_check:
            return False
        owner = self.owner
        owner._parsed += 1
        owner.frames += 1
        owner.unwanted += 1
        return True


# A run's timestamps, in order: the first field of each line.
_ASC_STAMP = re.compile(r"^[ \t]*([0-9.]+)", re.MULTILINE)
# The data bytes python-can reads of a classic frame, by DLC: min(8, length).
_ASC_DATA = "|".join([f"{dlc:X}(?:[ \\t]++{HEX_CLASS}{{2}}){{{min(8, length)}}}"
                      for dlc, length in enumerate((0, 1, 2, 3, 4, 5, 6, 7, 8))]
                     + [f"[9A-Fa-f](?:[ \\t]++{HEX_CLASS}{{2}}){{8}}"])


def _asc_runs(keys: frozenset[int], channel: str | None) -> re.Pattern:
    """A run of ASC lines that :meth:`_AscFilter.skips` takes (in ``base hex``), written as
    Vector's tools and python-can write them: ``seconds.decimals channel id[x] Rx|Tx d dlc
    bytes...`` (blanks and tabs between the fields, anything printable after the bytes), each
    with its newline, of ids not in ``keys`` (in any spelling: leading zeros, either case) and
    of ``channel`` when given; all with the same timestamp prefix (seconds and one or two
    decimals: group 1), which bounds their timestamps. Any other line is left to
    :meth:`_AscFilter.skips` and python-can."""
    standard = [f"{key:X}" for key in sorted(keys) if not key & EXTENDED_KEY]
    extended = [f"{key & 0x1FFFFFFF:X}" for key in sorted(keys) if key & EXTENDED_KEY]
    wanted = "|".join([f"0*(?i:{'|'.join(standard)})[ \\t]"] * bool(standard)
                      + [f"0*(?i:{'|'.join(extended)})[xX]"] * bool(extended))
    if channel is None:
        chan = "[0-9]{1,9}+"
    elif channel.isascii() and channel.isdigit() and str(int(channel)) == channel:
        chan = "0+" if channel == "0" else f"0*+{channel}"
    else:
        chan = "(?!)"                        # a channel no run names: every line is read
    line = (rf"[0-9]{{0,30}}+[ \t]++{chan}[ \t]++{f'(?!{wanted})' if wanted else ''}"
            rf"{HEX_CLASS}{{1,16}}+[xX]?[ \t]++[RrTt][Xx][ \t]++[dD][ \t]++(?:{_ASC_DATA})"
            rf"(?:[ \t][\t -~]*+)?\n")
    return re.compile(rf"[ \t]*+([0-9]{{1,30}}\.[0-9]{{1,2}}){line}(?:[ \t]*+\1{line})*+")
