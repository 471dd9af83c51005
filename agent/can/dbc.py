"""Loading DBC files with cantools, with one-line errors and tolerance for common quirks.

Real DBCs often fail cantools' strict checks (overlapping signals in messages we never map) or
write factors as ``.25``; neither should stop a user whose mapped signals are fine. Such files
load with a warning; real syntax errors name the file, line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import cantools
from cantools.database.can import Message

from agent.can.keys import EXTENDED_KEY, frame_key
from agent.errors import ConfigError

MAX_DBC_BYTES = 32 * 1024 * 1024

_SYNTAX = re.compile(r'Invalid syntax at line (\d+), column (\d+): "(.*)"', re.S)
# A number written without its leading zero (".25") inside an SG_ line's (factor,offset) or [min|max].
_LEADING_DOT = re.compile(r"(?<=[(,\[|])([-+]?)\.(\d)")


@dataclass
class VehicleDatabase:
    """The messages of one or more DBC files, indexed for the mapping."""

    files: tuple[Path, ...]
    by_key: dict[int, Message] = field(default_factory=dict)
    by_name: dict[str, Message] = field(default_factory=dict)
    source: dict[int, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def find(self, message: str | int) -> Message | None:
        """A message by name, or by frame id (11-bit ids first, then 29-bit)."""
        if isinstance(message, str):
            return self.by_name.get(message)
        return self.by_key.get(message) or self.by_key.get(message | EXTENDED_KEY)


def load_dbcs(paths: tuple[Path, ...] | list[Path],
              encodings: tuple[str | None, ...] | list[str | None] = ()) -> VehicleDatabase:
    """Load DBC files; ``encodings[i]`` (if given and not None) overrides the detected text
    encoding of ``paths[i]`` (UTF-8 when the file is valid UTF-8, else cp1252)."""
    vdb = VehicleDatabase(files=tuple(paths))
    for i, path in enumerate(paths):
        db = _load_one(path, vdb.warnings, encodings[i] if i < len(encodings) else None)
        for msg in db.messages:
            key = frame_key(msg.frame_id, msg.is_extended_frame)
            if key in vdb.by_key:
                other = vdb.source[key]
                raise ConfigError(f"{path}: message {msg.name} ({msg.frame_id:#x}) is also "
                                  f"defined in {other} as {vdb.by_key[key].name}")
            if msg.name in vdb.by_name:
                raise ConfigError(f"{path}: message name {msg.name} is also defined in "
                                  f"{vdb.source[frame_key(vdb.by_name[msg.name].frame_id, vdb.by_name[msg.name].is_extended_frame)]}")
            vdb.by_key[key] = msg
            vdb.by_name[msg.name] = msg
            vdb.source[key] = path
    return vdb


def _load_one(path: Path, warnings: list[str],
              encoding: str | None = None) -> cantools.database.Database:
    try:
        if path.stat().st_size > MAX_DBC_BYTES:
            raise ConfigError(f"{path}: DBC file larger than {MAX_DBC_BYTES} bytes")
        text = decode_text(path, path.read_bytes(), encoding)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DBC file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: DBC file is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read DBC file: {exc.strerror}") from None

    fixed = "\n".join(
        _LEADING_DOT.sub(r"\g<1>0.\2", line) if line.lstrip().startswith("SG_") else line
        for line in text.split("\n")
    )
    if fixed != text:
        warnings.append(f"{path}: numbers written without a leading zero (like .25) were read "
                        "as 0.25")
    try:
        db = _parse(fixed, strict=True)
        _check_complete(path, fixed, db)
        return db
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - cantools raises many types; all mean "bad DBC"
        strict_error = _message(exc)
        if _SYNTAX.search(str(exc)):
            raise ConfigError(f"{path}:{_syntax_location(exc)}") from None
    try:
        db = _parse(fixed, strict=False)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{_where(path, exc, fixed)}: not a usable DBC file: "
                          f"{_message(exc)}") from None
    try:
        _check_complete(path, fixed, db)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    warnings.append(f"{path}: loaded without cantools' strict checks ({strict_error})")
    return db


def decode_text(path: Path, data: bytes, encoding: str | None) -> str:
    """A DBC file's text: in ``encoding`` if given; else UTF-8 when the bytes are valid UTF-8
    (with or without BOM: opendbc's files), else cp1252 (CANdb++'s default; maps every byte)."""
    if encoding is not None:
        try:
            return data.decode(encoding)
        except (LookupError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read as {encoding}: {_one_line(str(exc))}") \
                from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


#: Strings ("...", with \" escapes) can span lines; a comment line starting with "SG_" is text.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
#: CANdb++ keeps unused signals in this pseudo-message; cantools drops it on purpose.
INDEPENDENT_SIGNALS = "VECTOR__INDEPENDENT_SIG_MSG"


def _declared(text: str) -> tuple[int, int]:
    """(messages, signals) the file declares, as cantools reads them: strings and the
    pseudo-message of independent signals left out."""
    messages = signals = 0
    independent = False
    for line in _STRING.sub('""', text).split("\n"):
        statement = line.lstrip()
        if statement.startswith("BO_ "):
            independent = INDEPENDENT_SIGNALS in statement.split(":", 1)[0].split()
            messages += not independent
        elif statement.startswith("SG_ "):
            signals += not independent
    return messages, signals


def _check_complete(path: Path, text: str, db: cantools.database.Database) -> None:
    """cantools silently ignores an incomplete last statement: a truncated file must not pass."""
    declared, signals = _declared(text)
    read_signals = sum(len(m.signals) for m in db.messages)
    if declared != len(db.messages) or signals != read_signals:
        raise ConfigError(f"looks truncated or damaged: {declared} messages and {signals} "
                          f"signals declared, {len(db.messages)} and {read_signals} read")


def _parse(text: str, strict: bool) -> cantools.database.Database:
    db = cantools.database.Database(strict=strict)
    db.add_dbc_string(text)
    if not db.messages:
        raise ConfigError("no messages (BO_) in it")
    return db


def _syntax_location(exc: Exception) -> str:
    match = _SYNTAX.search(str(exc))
    line, column, context = match.group(1), match.group(2), match.group(3)
    context = context.replace(">>!<<", "").strip()[:80]
    context = "".join(c if c.isprintable() else "?" for c in context)
    return f"{line}:{column}: DBC syntax error in: {context}"


def _message(exc: Exception) -> str:
    """cantools' message on one line, its detail kept (``unused VAL_ entries in DBC: VAL_ 945
    DoorFR``: cantools puts the entries on the lines after the first)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith('DBC: "') and lines[-1].endswith('"'):
        lines[0], lines[-1] = lines[0][6:], lines[-1][:-1]
    message = _one_line(" ".join(lines))
    return message if len(message) <= 300 else message[:300] + "..."


def _where(path: Path, exc: Exception, text: str) -> str:
    """``path:line`` of the first entry cantools' message names on its own line, or ``path``."""
    entries = [line.strip() for line in str(exc).strip().splitlines()[1:2] if line.strip()]
    number = _line_of(text, entries[0]) if entries else None
    return f"{path}:{number}" if number else str(path)


def _line_of(text: str, entry: str) -> int | None:
    """The number of the first line of ``text`` starting with ``entry`` (spaces collapsed)."""
    words = entry.split()
    for number, line in enumerate(text.split("\n"), 1):
        if line.split()[:len(words)] == words:
            return number
    return None


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in " ".join(text.split()))
