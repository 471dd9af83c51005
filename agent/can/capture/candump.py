"""candump -L log lines: ``(1700000000.123456) can0 123#DEADBEEF``.

Our own reader rather than python-can's: python-can's stops at the first malformed line (and
has no line numbers to report), and a plain split parser is ~3x faster on the hot path.
Also reads CAN FD (``123##1...``), remote (``123#R``) and error frames (id with CAN_ERR_FLAG).

The file is read in blocks of whole lines (a line is still bounded: one longer than
:data:`MAX_LINE` is skipped; "\r\n" is read as "\n"); from a lone carriage return on, line by
line, so line numbers are those of any text reader. :meth:`CandumpReader.filtered` is the fast
path of ``decode``: lines of ids nobody wants are checked for well-formedness and counted by a
regular expression over a block, never split into lines nor converted into a
:class:`can.Message`.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterator

import can

from .base import EXTENDED_KEY, HEX_DIGITS as _HEX, HEX_CLASS as _H, TOO_LONG as _TOO_LONG, \
    CaptureReader, Clock, finite, prefix_bound, text_blocks

CAN_ERR_FLAG = 0x20000000
_FD_LENGTHS = frozenset((0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64))
MAX_LINE = 1024
_LIMIT = MAX_LINE + 1          # a line of this many characters without its newline is too long
_IDS_REMEMBERED = 4096         # distinct wanted id texts whose last payload is kept
_NOT_SIMPLE = -1               # an id text that needs the full parser (error frame, invalid)


class CandumpReader(CaptureReader):
    format = "candump"
    lines_read = 0

    def __iter__(self) -> Iterator[can.Message]:
        for number, line in self._numbered():
            msg = self._frame(number, line)
            if msg is not None:
                yield msg

    def filtered(self, keys: frozenset[int], clock: Clock) -> Iterator[can.Message | float]:
        """See :meth:`CaptureReader.filtered`. Runs of plain lines of unwanted ids are found,
        checked and counted by one regular expression over a block (:func:`_unwanted_runs`),
        never split into lines; any other line (a wanted id, an error or remote frame, CAN FD,
        a malformed line, ...) goes through :meth:`_line`, as thorough as :meth:`__iter__`.
        A wanted id's data frame whose payload text is the one it had last is not made into a
        :class:`can.Message` when ``clock.repeated`` takes it."""
        runs = _unwanted_runs(keys, self.channel).match
        stamps = _STAMP.findall
        count_lines = str.count
        last_payload: dict[str, str] = {}   # wanted id text -> its last payload handed over
        check = clock.next_check
        number = unwanted = 0
        try:
            for chunk in text_blocks(self.handle, _LIMIT):
                if chunk.__class__ is list:
                    for line in chunk:
                        number += 1
                        yield from self._line(number, line, keys, clock, last_payload)
                    check = clock.next_check
                    self.lines_read = number
                    continue
                text, pos, size = chunk, 0, len(chunk)
                while pos < size:
                    run = runs(text, pos)
                    if run is None:                 # not a plain line of an unwanted id
                        end = text.index("\n", pos)
                        number += 1
                        line = text[pos:end] if end - pos < _LIMIT else _TOO_LONG
                        yield from self._line(number, line, keys, clock, last_payload)
                        check = clock.next_check
                        pos = end + 1
                        continue
                    end = run.end()
                    # Every timestamp of the run starts with the run's prefix (seconds and one
                    # or two decimals): none reaches a check above the prefix's interval.
                    if check > prefix_bound(run.group(1)):
                        lines = count_lines(text, "\n", pos, end)
                    else:
                        lines = 0
                        for t in map(float, stamps(text, pos, end)):
                            lines += 1
                            if t >= check:
                                yield t
                                check = clock.next_check
                    number += lines
                    unwanted += lines
                    pos = end
                self.lines_read = number
        except (OSError, EOFError, zlib.error) as exc:
            self.error = f"unreadable after line {number}: {exc}"
        finally:
            self.frames += unwanted
            self.unwanted += unwanted

    def _line(self, number: int, line: str, keys: frozenset[int], clock: Clock,
              last_payload: dict[str, str]) -> Iterator[can.Message | float]:
        """What :meth:`filtered` makes of a line that is not a plain frame of an unwanted id:
        a wanted frame (or its timestamp and nothing, when it repeats its last payload and
        ``clock.repeated`` takes it), an unwanted frame's timestamp when a check is due,
        or nothing (counted)."""
        want = self.channel
        parts = None if line is _TOO_LONG else line.split()
        sep = ""
        if parts is not None and len(parts) == 3:
            stamp, chan, frame = parts
            ident, sep, payload = frame.partition("#")
            if sep and (want is None or chan == want) and len(payload) <= 16 \
                    and last_payload.get(ident) == payload:
                # A wanted id repeating its payload: the decoder counts it as unchanged (if
                # it is, and not multiplexed) without a frame object.
                t = _timestamp(stamp)
                key = _simple_key(ident)
                if t is not None and key >= 0:
                    try:
                        data = bytes.fromhex(payload)
                    except ValueError:
                        data = None
                    if data is not None:
                        if t >= clock.next_check:
                            yield t
                        if clock.repeated(key, data, t):
                            self.frames += 1
                            return
        msg = self._frame(number, line, parts)
        if msg is None:
            return
        if msg.is_error_frame or (msg.arbitration_id | EXTENDED_KEY if msg.is_extended_id
                                  else msg.arbitration_id) in keys:
            if sep and not msg.is_error_frame and len(last_payload) < _IDS_REMEMBERED:
                last_payload[ident] = payload
            yield msg
            return
        self.unwanted += 1
        if msg.timestamp >= clock.next_check:
            yield msg.timestamp

    def _frame(self, number: int, line: str,
               parts: list[str] | None = None) -> can.Message | None:
        """The frame on a line, counted, if it is one of the channel read; None for any other
        line (counted as what it is)."""
        msg = self._parse(number, line, parts)
        if msg is None:
            return None
        if self.channel is not None and msg.channel != self.channel:
            self.other_channel += 1
            return None
        self.frames += 1
        return msg

    def _parse(self, number: int, line: str,
               parts: list[str] | None = None) -> can.Message | None:
        """The frame on a line; None for a blank line, a comment or a malformed line (counted)."""
        if line is _TOO_LONG:
            self._bad(number, "line too long")
            return None
        if parts is None:
            parts = line.split()
        if not parts or parts[0].startswith("#"):
            return None
        try:
            return parse_fields(parts)
        except ValueError as exc:
            self._bad(number, str(exc))
            return None

    def _numbered(self) -> Iterator[tuple[int, str]]:
        """(line number, line) for every line; _TOO_LONG in place of an overlong line."""
        number = 0
        try:
            for batch in self._batches():
                for line in batch:
                    number += 1
                    yield number, line
                self.lines_read = number
        except (OSError, EOFError, zlib.error) as exc:
            # A truncated or corrupt .gz: what was read stands, the rest is reported.
            self.error = f"unreadable after line {number}: {exc}"

    def _batches(self) -> Iterator[list[str]]:
        """Lists of lines (without their newline), _TOO_LONG for an overlong one."""
        for chunk in text_blocks(self.handle, _LIMIT):
            if chunk.__class__ is list:
                yield chunk
                continue
            lines = chunk[:-1].split("\n")
            if max(map(len, lines)) >= _LIMIT:
                lines = [line if len(line) < _LIMIT else _TOO_LONG for line in lines]
            yield lines


def _timestamp(stamp: str) -> float | None:
    """The value of a ``(digits.digits)`` field as parse_fields reads it, None if it is not one
    (what float() takes beyond digits and a dot is left to parse_fields)."""
    digits = stamp[1:-1]
    if stamp[:1] != "(" or stamp[-1:] != ")" or len(digits) >= 300 \
            or not digits.replace(".", "", 1).isdecimal():
        return None
    return float(digits)


# A run's timestamps, in order: the only parentheses on its lines (a run's channel has none).
_STAMP = re.compile(r"\(([0-9.]+)\)")
_CHANNEL = re.compile(r"[!-'*-~]{1,64}+")      # a channel a run may name: no space, no parens


def _unwanted_runs(keys: frozenset[int], channel: str | None) -> re.Pattern:
    """A run of lines that :meth:`CandumpReader.__iter__` takes as classic data frames of ids
    not in ``keys`` (of ``channel``, when given), as candump writes them: ``(seconds.decimals)
    channel id#data``, single spaces, each with its newline; all with the same timestamp prefix
    (the seconds and one or two decimals: group 1), which bounds their timestamps. The id
    texts of ``keys`` are excluded in any case; 3-digit ids are those up to 7FF, 8-digit ones
    up to 1FFFFFFF (so no error frame); the data is 0 to 8 bytes. Any other line (another
    spelling, a wanted id, an error, remote or CAN FD frame, a malformed line) is not part of
    a run: it is read line by line, by the full parser."""
    texts = sorted(f"{key & 0x1FFFFFFF:08X}" if key & EXTENDED_KEY else f"{key:03X}"
                   for key in keys)
    wanted = f"(?!(?i:{'|'.join(texts)})#)" if texts else ""
    if channel is None:
        chan = _CHANNEL.pattern
    elif _CHANNEL.fullmatch(channel):
        chan = re.escape(channel)
    else:
        chan = "(?!)"                        # a channel no run names: every line is read
    # Possessive repeats (a line, and its fields, match one way only): no backtracking state.
    frame = (rf"[0-9]{{0,30}}+\) {chan} {wanted}(?:[0-7]{_H}{{2}}|[01]{_H}{{7}})"
             rf"#(?:{_H}{{16}}|(?:{_H}{{2}}){{0,7}})\n")
    return re.compile(rf"\(([0-9]{{1,30}}\.[0-9]{{1,2}}){frame}(?:\(\1{frame})*+")


def _simple_key(ident: str) -> int:
    """The frame key of a data frame's id text, or _NOT_SIMPLE (error frame, or invalid: the
    full parser handles and reports those)."""
    if len(ident) not in (3, 8) or not _HEX.issuperset(ident):
        return _NOT_SIMPLE
    can_id = int(ident, 16)
    if len(ident) == 3:
        return can_id if can_id <= 0x7FF else _NOT_SIMPLE
    return can_id | EXTENDED_KEY if can_id <= 0x1FFFFFFF else _NOT_SIMPLE


def parse_fields(parts: list[str]) -> can.Message:
    """One candump -L line, already split on whitespace; ValueError says what is wrong."""
    if len(parts) < 3 or len(parts) > 4:
        raise ValueError("expected '(time) channel id#data'")
    stamp = parts[0]
    if len(stamp) < 3 or stamp[0] != "(" or stamp[-1] != ")":
        raise ValueError("bad timestamp")
    try:
        timestamp = float(stamp[1:-1])
    except ValueError:
        raise ValueError("bad timestamp") from None
    if not finite(timestamp):
        raise ValueError("bad timestamp")
    ident, sep, payload = parts[2].partition("#")
    if not sep or len(ident) not in (3, 8) or not _HEX.issuperset(ident):
        raise ValueError("bad frame id")
    can_id = int(ident, 16)
    extended = len(ident) == 8
    if extended and can_id & CAN_ERR_FLAG:
        # The payload holds the error details (linux/can/error.h); keep it.
        if len(payload) % 2 or len(payload) > 16 or not _HEX.issuperset(payload):
            raise ValueError("bad error frame data")
        return can.Message(timestamp=timestamp, channel=parts[1], is_error_frame=True,
                           arbitration_id=can_id & 0x1FFFFFFF, data=bytes.fromhex(payload))
    if can_id > (0x1FFFFFFF if extended else 0x7FF):
        raise ValueError("bad frame id")
    is_fd = False
    brs = esi = False
    if payload.startswith("#"):
        if len(payload) < 2 or payload[1] not in "0123456789abcdefABCDEF":
            raise ValueError("bad CAN FD flags")
        flags = int(payload[1], 16)
        brs, esi = bool(flags & 1), bool(flags & 2)
        is_fd = True
        payload = payload[2:]
    if payload[:1] in ("R", "r"):
        dlc_text = payload[1:]
        dlc = int(dlc_text) if dlc_text.isdigit() and len(dlc_text) == 1 else 0
        return can.Message(timestamp=timestamp, channel=parts[1], arbitration_id=can_id,
                           is_extended_id=extended, is_remote_frame=True, dlc=min(dlc, 8))
    if len(payload) % 2 or not _HEX.issuperset(payload):
        raise ValueError("bad data bytes")
    data = bytes.fromhex(payload)
    if (is_fd and len(data) not in _FD_LENGTHS) or (not is_fd and len(data) > 8):
        raise ValueError(f"{len(data)} data bytes is not a valid {'CAN FD' if is_fd else 'CAN'} length")
    return can.Message(timestamp=timestamp, channel=parts[1], arbitration_id=can_id,
                       is_extended_id=extended, data=data, is_fd=is_fd, bitrate_switch=brs,
                       error_state_indicator=esi)


def format_candump(msg: can.Message, channel: str | None = None) -> str:
    """A frame as a candump -L line (without the newline)."""
    chan = channel if channel is not None else (msg.channel or "can0")
    if msg.is_error_frame:
        ident = f"{CAN_ERR_FLAG | (msg.arbitration_id & 0x1FFFFFFF):08X}"
        return f"({msg.timestamp:.6f}) {chan} {ident}#{bytes(msg.data).hex().upper()}"
    ident = f"{msg.arbitration_id:08X}" if msg.is_extended_id else f"{msg.arbitration_id:03X}"
    if msg.is_remote_frame:
        return f"({msg.timestamp:.6f}) {chan} {ident}#R{msg.dlc if msg.dlc else ''}"
    data = bytes(msg.data).hex().upper()
    if msg.is_fd:
        flags = (1 if msg.bitrate_switch else 0) | (2 if msg.error_state_indicator else 0)
        return f"({msg.timestamp:.6f}) {chan} {ident}##{flags:X}{data}"
    return f"({msg.timestamp:.6f}) {chan} {ident}#{data}"
