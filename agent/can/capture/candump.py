"""candump -L log lines: ``(1700000000.123456) can0 123#DEADBEEF``.

Our own reader rather than python-can's: python-can's stops at the first malformed line (and
has no line numbers to report), and a plain split parser is ~3x faster on the hot path.
Also reads CAN FD (``123##1...``), remote (``123#R``) and error frames (id with CAN_ERR_FLAG).

The file is read in blocks and split on newlines (a line is still bounded: one longer than
:data:`MAX_LINE` is skipped); a file with carriage returns is read line by line from there on,
so line numbers are those of any text reader. :meth:`CandumpReader.filtered` is the fast path
of ``decode``: a frame whose id is not wanted is checked for well-formedness and counted,
never converted into a :class:`can.Message`.
"""

from __future__ import annotations

import io
import zlib
from typing import Callable, Iterator

import can

from .base import EXTENDED_KEY, HEX_DIGITS as _HEX, LINE_ENDS, CaptureReader, Clock, finite, \
    skip_rest

CAN_ERR_FLAG = 0x20000000
_FD_LENGTHS = frozenset((0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64))
MAX_LINE = 1024
_LIMIT = MAX_LINE + 1          # a line of this many characters without its newline is too long
_BLOCK = 64 * 1024             # characters read at a time (memory: one block and one line)
_BATCH = 512                   # lines per batch in line-by-line mode
_IDS_REMEMBERED = 4096         # distinct id texts whose meaning is kept (bounded by this)
_NOT_SIMPLE = -1               # an id text that needs the full parser (error frame, invalid)
# A batch's placeholder for a line longer than MAX_LINE: one object, told apart by identity;
# made at run time so that no line read can be that object, and with no whitespace, so that
# the fast path sees one field and leaves it to the full parser.
_TOO_LONG = "".join(("\0", "too-long"))


class CandumpReader(CaptureReader):
    format = "candump"
    lines_read = 0

    def __iter__(self) -> Iterator[can.Message]:
        want = self.channel
        for number, line in self._numbered():
            msg = self._parse(number, line)
            if msg is None:
                continue
            if want is not None and msg.channel != want:
                self.other_channel += 1
                continue
            self.frames += 1
            yield msg

    def filtered(self, keys: frozenset[int], clock: Clock) -> Iterator[can.Message | float]:
        """See :meth:`CaptureReader.filtered`. A line of an unwanted id is checked as
        thoroughly as by :meth:`__iter__` (a malformed one is reported the same) but never
        made into a :class:`can.Message`; nor is one of a wanted id whose payload text is
        the one it had last, when ``clock.repeated`` takes it."""
        want = self.channel
        meaning: dict[str, bool] = {}   # id text -> a well-formed id nobody wants
        last_payload: dict[str, str] = {}   # wanted id text -> its last payload handed over
        fromhex = bytes.fromhex
        # Timestamps: float() of a 17-digit one costs more than the rest of the line. A
        # timestamp that starts with the integer part (`second`, checked once) of the previous
        # one is checked by its decimals alone and compared as text with `below`, a bound 1 ms
        # under next_check written the same way (exact for equal integer parts); only from
        # there on is it converted and compared as a number. next_check changes only while a
        # yield is out, so the bound is renewed after each yield.
        second, below = " ", ""      # " " starts no field: no timestamp seen yet
        cut = 1
        check = clock.next_check
        number = unwanted = 0
        try:
            for batch in self._batches():
                for line in batch:
                    number += 1
                    parts = line.split()
                    if len(parts) == 3:
                        stamp, chan, frame = parts
                        ident, sep, payload = frame.partition("#")
                        unwanted_id = meaning.get(ident)
                        if unwanted_id is None:
                            key = _simple_key(ident)
                            unwanted_id = key >= 0 and key not in keys
                            if len(meaning) < _IDS_REMEMBERED:
                                meaning[ident] = unwanted_id
                        # fromhex() refuses an odd length, "R" (remote) and "#" (CAN FD).
                        if unwanted_id and sep and (want is None or chan == want) \
                                and len(payload) <= 16:
                            try:
                                fromhex(payload)
                            except ValueError:
                                pass                # the full parser says what is wrong
                            else:
                                if stamp.startswith(second) and stamp[cut:-1].isdecimal() \
                                        and stamp[-1] == ")":
                                    unwanted += 1
                                    if stamp >= below:
                                        t = float(stamp[1:-1])
                                        if t >= check:
                                            yield t
                                            check = clock.next_check
                                            below = _text_bound(check, second)
                                    continue
                                t = _timestamp(stamp)
                                if t is not None:
                                    unwanted += 1
                                    dot = stamp.find(".")
                                    if dot > 0 and stamp[1:dot].isascii():
                                        second = stamp[:dot + 1]
                                        cut = dot + 1
                                        below = _text_bound(check, second)
                                    if t >= check:
                                        yield t
                                        check = clock.next_check
                                        below = _text_bound(check, second)
                                    continue
                        elif sep and (want is None or chan == want) and len(payload) <= 16 \
                                and last_payload.get(ident) == payload:
                            # A wanted id repeating its payload: the decoder counts it as
                            # unchanged (if it is, and not multiplexed) without a frame object.
                            t = _timestamp(stamp)
                            key = _simple_key(ident)
                            if t is not None and key >= 0:
                                try:
                                    data = fromhex(payload)
                                except ValueError:
                                    data = None
                                if data is not None:
                                    if t >= check:
                                        yield t
                                        check = clock.next_check
                                        below = _text_bound(check, second)
                                    if clock.repeated(key, data, t):
                                        self.frames += 1
                                        continue
                    msg = self._parse(number, line, parts)
                    if msg is None:
                        continue
                    if want is not None and msg.channel != want:
                        self.other_channel += 1
                        continue
                    if msg.is_error_frame or (msg.arbitration_id | EXTENDED_KEY
                                              if msg.is_extended_id else msg.arbitration_id) in keys:
                        self.frames += 1
                        if len(parts) == 3 and sep and not msg.is_error_frame \
                                and len(last_payload) < _IDS_REMEMBERED:
                            last_payload[ident] = payload
                        yield msg
                    else:
                        unwanted += 1
                        if msg.timestamp < check:
                            continue
                        yield msg.timestamp
                    check = clock.next_check
                    below = _text_bound(check, second)
                self.lines_read = number
        except (OSError, EOFError, zlib.error) as exc:
            self.error = f"unreadable after line {number}: {exc}"
        finally:
            self.frames += unwanted
            self.unwanted += unwanted

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
        """Lists of lines (without their newline), _TOO_LONG for an overlong one. Blocks split on
        newlines while the file has no carriage return and no overlong line; from the first
        of those on, line by line, as Python's text files split lines."""
        read = self.handle.read
        carry = ""
        while True:
            block = read(_BLOCK)
            if not block:
                if carry:
                    yield [carry if len(carry) < _LIMIT else _TOO_LONG]
                return
            text = carry + block if carry else block
            if "\r" in block:
                break
            cut = text.rfind("\n")
            carry = text[cut + 1:]
            if cut >= 0:
                lines = text[:cut].split("\n")
                if max(map(len, lines)) >= _LIMIT:
                    lines = [line if len(line) < _LIMIT else _TOO_LONG for line in lines]
                yield lines
            if len(carry) >= _LIMIT:
                text = carry
                break
        yield from _line_batches(self._readline_after(text))

    def _readline_after(self, pending: str) -> Callable[[int], str]:
        """A readline over ``pending`` (read already, from a line's start) and then the rest
        of the file, splitting lines exactly as the file's own readline does."""
        if pending.endswith("\r"):
            pending += self.handle.read(1)            # "\r\n" is one line end, not two
        if not pending.endswith(LINE_ENDS):
            rest = self.handle.readline(_LIMIT)       # the rest of the last line read
            pending += rest
            if len(rest) == _LIMIT and not rest.endswith(LINE_ENDS):
                skip_rest(self.handle.readline)       # overlong: dropped to its newline
                pending += "\n"
        head = io.StringIO(pending, newline="").readline
        tail = self.handle.readline

        def readline(limit: int) -> str:
            return head(limit) or tail(limit)

        return readline


def _timestamp(stamp: str) -> float | None:
    """The value of a ``(digits.digits)`` field as parse_fields reads it, None if it is not one
    (what float() takes beyond digits and a dot is left to parse_fields)."""
    digits = stamp[1:-1]
    if stamp[:1] != "(" or stamp[-1:] != ")" or len(digits) >= 300 \
            or not digits.replace(".", "", 1).isdecimal():
        return None
    return float(digits)


def _text_bound(check: float, second: str) -> str:
    """A timestamp field 1 ms below ``check``, written with the integer digits of ``second``
    ("(1700000000."); timestamps starting with ``second`` and below it as text are below
    ``check`` as numbers. "" (no such bound: compare numbers) when the digits differ in count."""
    if not abs(check) < 1e12:
        return ""
    # 1 ms: far more than the rounding of the 9 decimals written (float error < 1e-4 s here).
    text = f"({check - 1e-3:.9f})"
    return text if text.find(".") == len(second) - 1 else ""


def _simple_key(ident: str) -> int:
    """The frame key of a data frame's id text, or _NOT_SIMPLE (error frame, or invalid: the
    full parser handles and reports those)."""
    if len(ident) not in (3, 8) or not _HEX.issuperset(ident):
        return _NOT_SIMPLE
    can_id = int(ident, 16)
    if len(ident) == 3:
        return can_id if can_id <= 0x7FF else _NOT_SIMPLE
    return can_id | EXTENDED_KEY if can_id <= 0x1FFFFFFF else _NOT_SIMPLE


def _line_batches(readline: Callable[[int], str]) -> Iterator[list[str]]:
    while True:
        batch: list[str] = []
        for _ in range(_BATCH):
            line = readline(_LIMIT)     # bounded: memory never holds more than one short line
            if not line:
                break
            if len(line) == _LIMIT and not line.endswith(LINE_ENDS):
                skip_rest(readline)
                line = _TOO_LONG
            batch.append(line)
        if batch:
            yield batch
        if len(batch) < _BATCH:
            return


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
