"""ASC, TRC and BLF through python-can's readers, made resilient and line-aware.

python-can's text readers end the whole iteration at the first line they cannot parse. We feed
them through a line-counting file wrapper and, when one raises, record the line and resume a
copy of the reader (header state kept) on the rest of the file, so one bad line costs one frame.
"""

from __future__ import annotations

import copy
import os
import zlib
from typing import IO, Iterator

import can

from .base import CaptureReader

_READERS = {"asc": can.ASCReader, "trc": can.TRCReader, "blf": can.BLFReader}
# Vector tools number channels from 1; python-can reports them from 0.
_ONE_BASED = frozenset(("asc", "blf"))


class _CountingLines:
    """A text file that counts the lines handed out, and ends (remembering why) where the file
    cannot be read any further (a truncated or corrupt .gz), instead of raising into python-can,
    which would take it for one bad line and try again forever."""

    def __init__(self, handle: IO) -> None:
        self.handle = handle
        self.number = 0
        self.failed: Exception | None = None

    def __iter__(self) -> "_CountingLines":
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def readline(self) -> str:
        if self.failed is not None:
            return ""
        try:
            line = self.handle.readline()
        except (OSError, EOFError, zlib.error) as exc:
            self.failed = exc
            return ""
        if line:
            self.number += 1
        return line

    def close(self) -> None:
        self.handle.close()


class PythonCanReader(CaptureReader):
    def __init__(self, path, handle, fmt: str, channel: str | None) -> None:
        super().__init__(path, handle, channel)
        self.format = fmt

    def __iter__(self) -> Iterator[can.Message]:
        if self.format == "blf":
            yield from self._frames(self._blf())
        else:
            yield from self._frames(self._text())

    def _frames(self, messages: Iterator[can.Message]) -> Iterator[can.Message]:
        want = self.channel
        one_based = self.format in _ONE_BASED
        for msg in messages:
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
        lines = _CountingLines(self.handle)
        try:
            # Absolute timestamps (from the ASC header's date) like candump's, not from 0.
            kwargs = {"relative_timestamp": False} if self.format == "asc" else {}
            reader = _READERS[self.format](lines, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.error = f"not a readable {self.format.upper()} file ({exc})"
            return
        iterator = iter(reader)
        while True:
            try:
                msg = next(iterator)
            except StopIteration:
                if lines.failed is not None:
                    self.error = f"unreadable after line {lines.number}: {lines.failed}"
                return
            except Exception as exc:  # noqa: BLE001 - python-can raises ValueError, IndexError...
                if self.frames == 0 and self.malformed == 0 and str(exc).startswith("File has no"):
                    # A header problem (TRC without $STARTTIME/$COLUMNS): nothing after it parses.
                    self.error = f"not a readable {self.format.upper()} file ({exc})"
                    return
                self._bad(lines.number, type(exc).__name__ if not str(exc) else str(exc)[:60])
                resumed = copy.copy(reader)
                resumed._extract_header = lambda: None  # the header was read already
                iterator = iter(resumed)
                continue
            yield msg

    def _blf(self) -> Iterator[can.Message]:
        compressed = self.path.name.lower().endswith(".gz")
        actual = None if compressed else os.fstat(self.handle.fileno()).st_size
        try:
            reader = can.BLFReader(self.handle)
            yield from reader
            # python-can stops quietly at a truncated file; the header knows the real size.
            expected = getattr(reader, "file_size", None)
            if actual is not None and expected:
                if actual < expected:
                    self.error = (f"BLF file truncated ({actual} of {expected} bytes) after "
                                  f"{self.frames} frame(s)")
        except Exception as exc:  # noqa: BLE001 - a truncated/corrupt binary file cannot resume
            self.error = f"BLF data unreadable after {self.frames} frame(s): {str(exc)[:80]}"
