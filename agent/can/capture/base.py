"""What every capture reader offers."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Iterator

import can

#: How many malformed line numbers a reader remembers to show the user.
FIRST_MALFORMED = 5


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

    def __iter__(self) -> Iterator[can.Message]:
        raise NotImplementedError

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
