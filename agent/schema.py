"""Reading untrusted YAML into plain values, with errors that name the file and the key path.

Config and mapping loaders use these helpers at the boundary; everything after them works
with typed, frozen dataclasses and trusts them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from agent.errors import ConfigError

#: Refuse files larger than this before parsing them (a config is a few KiB).
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
CREDENTIALS_PREFIX = "${" + CREDENTIALS_VARIABLE + "}/"
MAX_YAML_BYTES = 4 * 1024 * 1024


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and duplicate-key detection.

    YAML 1.1 reads ``ON``, ``OFF``, ``yes``, ``no`` as booleans, which silently turns a
    value-table name such as ``ON`` into ``True``; only ``true``/``false`` are booleans here.
    """


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    result: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=deep)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

#: A number YAML 1.1 reads as a string: exponent without a dot (``1e3``, ``-2.5E-1`` parse).
_FLOAT_TEXT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+")

#: Longest integer literal accepted: 64-bit values fit; 4,000-digit ones would cost seconds
#: (or hit Python's int-string limit) and overflow every float conversion after them.
MAX_INT_LITERAL = 40


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    if len(str(node.value)) > MAX_INT_LITERAL:
        raise yaml.constructor.ConstructorError(None, None, "integer out of range",
                                                node.start_mark)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; any failure becomes one ConfigError naming the file (and line)."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {what} file is {size} bytes, more than {MAX_YAML_BYTES}")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} file is a directory") from None
    except PermissionError:
        raise ConfigError(f"{path}: {what} file is not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} file is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{path}: YAML error: {str(exc).splitlines()[0][:200]}") from None


class Section:
    """A YAML mapping being validated: knows its file and key path for error messages."""

    def __init__(self, data: Any, file: Path, path: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: {path or 'top level'}: expected a mapping, got {describe(data)}")
        self.data = data
        self.file = file
        self.path = path

    def where(self, key: str | None = None) -> str:
        if key is None:
            return self.path or "top level"
        shown = str(key) if str(key).isprintable() else repr(str(key))   # keep errors one line
        return f"{self.path}.{shown}" if self.path else shown

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where(key)}: {message}")

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                shown = str(key) if str(key).isprintable() else repr(str(key))
                raise self.error(shown, f"unknown key (expected one of: {', '.join(allowed)})")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def section(self, key: str, required: bool = False) -> "Section | None":
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "missing (expected a mapping)")
            return None
        return Section(value, self.file, self.where(key))

    def get(self, key: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, f"missing (expected {_kind_name(kind)})")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value) and (
                kind is float or (isinstance(kind, tuple) and float in kind)):
            value = float(value)    # YAML 1.1 leaves 1e3 (no dot) a string; YAML 1.2 does not
        if isinstance(value, bool) and kind is not bool and not (
            isinstance(kind, tuple) and bool in kind
        ):
            raise self.error(key, f"expected {_kind_name(kind)}, got {describe(value)}")
        if not isinstance(value, kind):
            raise self.error(key, f"expected {_kind_name(kind)}, got {describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value}")
        return value

    def text(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.get(key, (str, int), default, required)
        if value is None:
            return None
        value = str(value)
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def number(self, key: str, default: float | None = None, *, minimum: float | None = None,
               required: bool = False, exclusive_minimum: bool = False) -> float | None:
        value = self.get(key, (int, float), default, required)
        if value is None:
            return None
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            relation = "greater than" if exclusive_minimum else "at least"
            raise self.error(key, f"expected a number {relation} {minimum}, got {value}")
        return value

    def integer(self, key: str, default: int | None = None, *, minimum: int | None = None,
                maximum: int | None = None, required: bool = False) -> int | None:
        value = self.get(key, int, default, required)
        if value is None:
            return None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.error(key, f"expected an integer in [{minimum}, {maximum}], got {value}")
        return value

    def path_value(self, key: str, required: bool = False) -> Path | None:
        """A file path; relative paths resolve against the folder of the file being read."""
        value = self.text(key, required=required)
        if value is None:
            return None
        if "\x00" in value:
            raise self.error(key, "a path must not contain NUL bytes")
        value = expand_credentials_path(value, f"{self.file}: {self.where(key)}", unset_ok=True)
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.file.parent / path)


def describe(value: Any) -> str:
    """A short, safe description of a YAML value for an error message."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a mapping"}
    if isinstance(kind, tuple):
        if set(kind) == {int, float}:
            return "a number"
        if set(kind) == {str, int}:
            return "a string"
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def expand_credentials_path(value: str, where: str = "",
                            environ: dict[str, str] | None = None, *,
                            unset_ok: bool = False) -> str:
    """Expand a leading ``${CREDENTIALS_DIRECTORY}/`` in a config path; other text unchanged.

    Only this one variable, only at the start: config paths are not shell strings.
    ``where`` prefixes the error (e.g. ``"config.yaml: mqtt.key"``). With ``unset_ok`` a path
    using the variable while it is not set is returned unchanged, so that commands which never
    open the file (``decode``, ``check-config``) work outside systemd;
    :func:`check_private_key_file` then names the problem if the key is needed.

    :raises ConfigError: if the path uses the variable and it is not set (not started by
        systemd with ``LoadCredential=``) and not ``unset_ok``, if it names nothing after it,
        or if another ``${...}`` appears in the path.
    """
    if not value.startswith(CREDENTIALS_PREFIX):
        if "${" in value:
            raise ConfigError(f"{where + ': ' if where else ''}{value!r}: only "
                              f"${{{CREDENTIALS_VARIABLE}}}/ at the start of a path is expanded")
        return value
    env = os.environ if environ is None else environ
    base = env.get(CREDENTIALS_VARIABLE)
    rest = value[len(CREDENTIALS_PREFIX):]
    prefix = f"{where}: " if where else ""
    if not rest or rest.startswith("/"):
        raise ConfigError(f"{prefix}{value!r}: expected ${{{CREDENTIALS_VARIABLE}}}/<name>")
    if not base:
        if unset_ok:
            return value
        raise ConfigError(f"{prefix}{value!r} uses ${{{CREDENTIALS_VARIABLE}}}, which is not set "
                          "(systemd sets it for a unit with LoadCredential=; outside systemd "
                          "give the key's real path)")
    return os.path.join(base, rest)
