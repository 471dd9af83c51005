"""Capture files: candump -L, Vector ASC, BLF and PEAK TRC (optionally gzip-compressed).

Each format has its own module; :func:`open_capture` picks one by extension (sniffing ``.log``,
which is both candump's and, often, Vector's). Readers stream: memory does not grow with the
file. A line that cannot be parsed is counted, remembered by line number and skipped.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

from agent.errors import UserError
from .base import CaptureReader, read_line
from .candump import CandumpReader, format_candump
from .pythoncan import PythonCanReader

FORMATS = ("candump", "asc", "blf", "trc")
_BY_SUFFIX = {".log": "candump", ".candump": "candump", ".asc": "asc", ".blf": "blf",
              ".trc": "trc"}

__all__ = ["CaptureReader", "open_capture", "detect_format", "format_candump", "FORMATS"]


def detect_format(path: Path) -> str:
    name = path.name.lower()
    compressed = name.endswith(".gz")
    suffix = Path(name[:-3] if compressed else name).suffix
    fmt = _BY_SUFFIX.get(suffix)
    if fmt is None:
        raise UserError(f"{path}: unknown capture format {suffix or '(no extension)'!r} "
                        f"(expected .log, .asc, .blf, .trc, optionally .gz; or pass --format)")
    if suffix == ".log":
        fmt = _sniff_log(path, compressed)
    return fmt


def _sniff_log(path: Path, compressed: bool) -> str:
    """``.log`` files are candump -L, or Vector ASC renamed: look at the first content line."""
    try:
        with _open_text(path, compressed) as f:
            for _ in range(50):
                line = read_line(f.readline)
                if line == "":
                    break
                if line is None:
                    continue    # an overlong line: skipped, not held in memory
                text = line.strip()
                if not text:
                    continue
                if text.startswith("("):
                    return "candump"
                if text.lower().startswith(("date ", "base ", "// ", "begin triggerblock")):
                    return "asc"
                break
    except (OSError, EOFError, zlib.error):
        pass  # the reader reports the real error
    return "candump"


def _open_text(path: Path, compressed: bool) -> io.TextIOBase:
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def open_capture(path: str | Path, fmt: str | None = None,
                 channel: str | None = None) -> CaptureReader:
    """A streaming reader of ``path``; ``channel`` keeps only frames of that channel."""
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise UserError(f"{path}: unknown capture format {fmt!r} (expected {', '.join(FORMATS)})")
    compressed = path.name.lower().endswith(".gz")
    try:
        if fmt == "blf":
            handle = gzip.open(path, "rb") if compressed else open(path, "rb")
        else:
            handle = _open_text(path, compressed)
    except FileNotFoundError:
        raise UserError(f"{path}: capture file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: capture file is a directory") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot open capture file: {exc.strerror}") from None
    if fmt == "candump":
        return CandumpReader(path, handle, channel)
    return PythonCanReader(path, handle, fmt, channel)
