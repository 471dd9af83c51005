"""Fuzz and property tests (Hypothesis) over everything the agent reads from outside.

The contract: every input ends in either correct output or a one-line error naming the file,
line or key (a :class:`agent.errors.UserError`) -- never another exception, never a hang,
never unbounded memory. Covered here, in process:

* config and mapping loaders: random YAML documents, mutations of the real demo files (text
  and data level), deep nesting, huge strings, binary garbage, NUL bytes, invalid UTF-8, alias
  and merge-key bombs;
* the mapping bound to the DBC (``load_vehicle``), then fed random frames;
* the DBC loader: truncations every N bytes and byte/line mutations of the demo DBC and of the
  real DBCs in ``../shared/data`` (skipped only when that folder is missing);
* capture readers (candump, ASC, TRC, BLF, gzip): random bytes and line soups;
* the decoder and state (``SignalPipeline``) with random frames and times;
* inbound MQTT: the agent subscribes to one topic only (its snapshot requests, whose check is
  fuzzed in tests/test_snapshot.py); the cloud watcher's ``MessageChecker`` gets
  random topics and payloads, forged and validly signed tokens with wrong claim types.

Everything is derandomized (reproducible in CI). A known bug is pinned by an
``xfail(strict=True)`` test: when it is fixed the test XPASSes and fails the run, and the
marker (and any exclusion in the strategies that worked around it) must go.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import inspect
import json
import math
import random
import signal
import resource
import threading
from pathlib import Path
from typing import Any, Iterator

import can
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import event, given, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st

from agent.can.capture import open_capture
from agent.cloud.checks import MAX_PAYLOAD_BYTES, MAX_SEQ, MessageChecker
from agent.cloud.watch import format_human
from agent.config import VEHICLE_ID_PATTERN, load_config
from agent.can.dbc import load_dbcs
from agent.errors import ConfigError, UserError
from agent.signals.mapping import load_mapping
from agent.dev.pki import init_pki
from agent.schema import load_yaml
from agent.signals.model import INVALID, KNOWN_VSS, QUALITIES, STALE, VALID
from agent.uplink.signing import Signer, Verifier, b64url_encode
from agent.signals.state import SignalPipeline
from agent.signals.vehicle import load_vehicle
from coredata import one_line
from support.soups import FUZZ, _LINES, _format_soup, _soup

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEMO_CONFIG = ROOT / "config" / "demo.yaml"
DEMO_MAPPING = ROOT / "config" / "mapping" / "demo_vehicle.yaml"
DEMO_DBC = ROOT / "dbc" / "demo_vehicle.dbc"
SHARED_DBCS = sorted(SHARED.glob("*.dbc")) if SHARED.is_dir() else []



# --------------------------------------------------------------------------- helpers


class Hang(BaseException):
    """Raised by :func:`time_limit`. A BaseException: ``except Exception`` cannot swallow it."""


class Runaway(BaseException):
    """A capture reader reported more malformed lines than the file has lines (a loop)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (raise :class:`Hang`) if the block runs longer than ``seconds`` (main thread)."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    hung = None
    try:
        yield
    except Hang as exc:
        hung = str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if hung:   # a plain failure: a traceback through the signal handler confuses pytest
        pytest.fail(f"hang: {hung}", pytrace=False)


def note(label: str) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics): how often each outcome occurs."""
    try:
        event(label)
    except InvalidArgument:   # not inside a Hypothesis test
        pass


def check_user_error(exc: BaseException, *files: Path) -> str:
    """``exc`` is a UserError whose message is one line naming (one of) ``files``."""
    assert isinstance(exc, UserError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert one_line(message), f"not one line: {message!r}"
    assert any(str(f) in message for f in files), f"names none of {files}: {message!r}"
    return message


def outcome(fn, *args, limit: float = 20.0):
    """(result, None) or (None, exception), within ``limit`` seconds (time limits do not nest)."""
    try:
        with time_limit(limit):
            return fn(*args), None
    except Runaway:
        raise
    except Exception as exc:  # noqa: BLE001 - the caller judges the exception type
        return None, exc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_COUNTER = iter(range(10**9))


def fresh(folder: Path, name: str) -> Path:
    """A new file name in ``folder`` (Hypothesis runs many examples per test)."""
    sub = folder / f"case{next(_COUNTER)}"
    sub.mkdir()
    return sub / name


# --------------------------------------------------------------------------- strategies: YAML

# Any text, line breaks included: errors must stay one line (keys are escaped).
_SAFE_CHARS = st.characters(blacklist_categories=("Cs",))
_WEIRD_TEXT = st.text(alphabet=_SAFE_CHARS, max_size=12) | st.sampled_from(
    ["", " ", "*", "+", "#", "/", "${CREDENTIALS_DIRECTORY}/x", "${X}", "~", "..", "\x00",
     "\t", "ON", "off", "yes", "null", "0x10", "1e3", ".inf", "-", "Vehicle", "Vehicle.",
     "Vehicle.A.B", "Vehicle.Body.Hood.IsOpen", "é", "\u202e", "\ufeff"])
# Integers of every size Hypothesis can show (its own repr stops at 4300 digits); bigger
# literals are covered by test_huge_integer_gives_one_line_error.
_INTS = st.integers(-2**64, 2**64) | st.sampled_from([0, 1, -1, 5, 100, 1000, 65535, 65536,
                                                      0x1FFFFFFF, 0x20000000, 10**300])
_SCALARS = (st.none() | st.booleans() | _INTS | st.floats() | _WEIRD_TEXT
            | st.binary(max_size=8) | st.dates())
_TOP_KEYS = ["vehicle_id", "can", "dbc", "mapping", "signing", "mqtt", "store", "policy",
             "logging", "security"]
_SECTION_KEYS = {
    "can": ["interface", "channel", "fd", "bitrate", "capture", "format", "realtime",
            "capture_channel"],
    "signing": ["key"],
    "mqtt": ["host", "port", "ca", "cert", "key", "topic_prefix", "client_id", "keepalive_s",
             "max_inflight", "tls_version", "reconnect_min_s", "reconnect_max_s"],
    "store": ["path", "max_bytes", "max_age_s"],
    "policy": ["immediate", "deadband", "min_interval_s", "snapshot_min_interval_s",
               "heartbeat_s", "max_messages_per_s", "max_pending_batches"],
    "logging": ["level", "stats_interval_s", "mask_vin"],
    "security": ["cert_warn_days"],
}
_ALL_KEYS = sorted({k for keys in _SECTION_KEYS.values() for k in keys} | set(_TOP_KEYS)
                   | {"signals", "message", "signal", "scale", "offset", "invalid", "values",
                      "mux", "timeout_ms", "decimals", "stale_factor", "default_timeout_ms"})
_KEYS = (st.sampled_from(_ALL_KEYS) | _WEIRD_TEXT | _INTS | st.booleans() | st.none()
         | st.floats(allow_nan=False) | st.dates())
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(_KEYS, inner, max_size=4), max_leaves=12)


def _section(name: str) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(_SECTION_KEYS[name]) | _KEYS, _VALUES,
                           max_size=len(_SECTION_KEYS[name]) + 1)


# Values each key accepts (or nearly): so that valid configs, and the checks after the type
# checks, are reached too -- not only "expected a string, got a list".
_GOOD = {
    "interface": st.sampled_from(["socketcan", "virtual", "pcan"]),
    "channel": st.sampled_from(["vcan0", "can0", "PCAN_USBBUS1"]), "fd": st.booleans(),
    "bitrate": st.integers(0, 2 * 10**7), "capture": st.sampled_from(["drive.log", "x.blf"]),
    "format": st.sampled_from(["candump", "asc", "blf", "trc", "pcap"]),
    "realtime": st.booleans(), "capture_channel": st.sampled_from(["can0", "1"]),
    "key": st.sampled_from(["pki/VIN1.key", "/abs/k.key", "${CREDENTIALS_DIRECTORY}/k"]),
    "host": st.sampled_from(["localhost", "127.0.0.1", "::1", "broker.example"]),
    "port": st.integers(-1, 70000), "ca": st.just("pki/ca.crt"), "cert": st.just("c.crt"),
    "topic_prefix": st.sampled_from(["vehicles", "fleet/eu", "a+b", "/x", "x/", "#"]),
    "client_id": st.sampled_from(["c1", "VIN1"]), "keepalive_s": st.integers(0, 4000),
    "max_inflight": st.integers(0, 1001), "tls_version": st.sampled_from(["1.2", "1.3", 1.2,
                                                                          1.3, "1.1", 1.0]),
    "reconnect_min_s": st.floats(0, 100), "reconnect_max_s": st.floats(0, 1000),
    "path": st.sampled_from(["outbox.db", "/var/lib/x/outbox.db"]),
    "max_bytes": st.integers(0, 2**40), "max_age_s": st.floats(0, 1e9),
    "immediate": st.lists(st.sampled_from(["*.IsOpen", "Vehicle.*", "", "*"]), max_size=3),
    "deadband": st.dictionaries(st.sampled_from(["*", "*.Range", "Vehicle.A"]),
                                st.floats(-1, 1e6) | st.integers(-1, 10**6), max_size=3),
    "min_interval_s": st.floats(-1, 100), "snapshot_min_interval_s": st.floats(-1, 100),
    "heartbeat_s": st.floats(0, 1e5), "max_messages_per_s": st.floats(0, 100),
    "max_pending_batches": st.integers(0, 2 * 10**6),
    "level": st.sampled_from(["debug", "info", "warning", "error", "INFO", "trace"]),
    "stats_interval_s": st.floats(0, 1e4), "mask_vin": st.booleans(),
    "cert_warn_days": st.integers(-1, 4000),
}


def _good_section(name: str) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={
        key: st.one_of(_GOOD[key], _GOOD[key], _GOOD[key], _SCALARS)
        for key in _SECTION_KEYS[name]})


_PLAUSIBLE_CONFIG = st.fixed_dictionaries(
    {"vehicle_id": st.sampled_from(["VIN1", "a.b-c_9", "X" * 64, "X" * 65, "-x", "a b"]),
     "dbc": st.sampled_from(["a.dbc", ["a.dbc", "/abs/b.dbc"], [], "", "  "]),
     "mapping": st.sampled_from(["m.yaml", "/abs/m.yaml"])},
    optional={name: _good_section(name) for name in _SECTION_KEYS})

_CONFIG_DOCS = st.one_of(
    _PLAUSIBLE_CONFIG, _PLAUSIBLE_CONFIG,
    _VALUES,   # anything at all at the top level
    st.fixed_dictionaries(
        {},
        optional={"vehicle_id": st.just("VIN1") | _SCALARS,
                  "dbc": st.just("a.dbc") | st.lists(_WEIRD_TEXT, max_size=3) | _VALUES,
                  "mapping": st.just("m.yaml") | _SCALARS,
                  **{name: _section(name) | _VALUES for name in _SECTION_KEYS}},
    ).flatmap(lambda d: st.dictionaries(_KEYS, _VALUES, max_size=2).map(
        lambda extra: {**extra, **d})),
)


def dump(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, default_flow_style=None, width=2**16)


def load_demo(path: Path) -> Any:
    return load_yaml(path, "demo")


def positions(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every position in a YAML tree, as a key path."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from positions(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from positions(value, prefix + (i,))


def mutate(doc: Any, data: st.DataObject, values: st.SearchStrategy | None = None) -> Any:
    """Apply 1-3 random structural mutations (delete, retype, add unknown key, nest)."""
    doc = copy.deepcopy(doc)
    values = st.one_of(st.sampled_from([g for g in _GOOD.values()]).flatmap(lambda g: g),
                       _VALUES if values is None else values)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]), label="mutations")):
        where = data.draw(st.sampled_from(list(positions(doc))), label="position")
        op = data.draw(st.sampled_from(["delete", "retype", "add", "nest", "listify"]),
                       label="op")
        if not where:
            if op in ("retype", "delete"):
                doc = data.draw(values, label="new document")
            continue
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        last = where[-1]
        if op == "delete":
            del parent[last]
        elif op == "retype":
            parent[last] = data.draw(values, label="new value")
        elif op == "add":
            target = parent[last]
            if isinstance(target, dict):
                target[data.draw(_KEYS, label="new key")] = data.draw(values, label="value")
            else:
                parent[last] = {data.draw(_KEYS, label="new key"): target}
        elif op == "nest":
            depth = data.draw(st.integers(1, 30), label="depth")
            value = parent[last]
            for _ in range(depth):
                value = [value] if data.draw(st.booleans(), label="list?") else {"x": value}
            parent[last] = value
        else:
            parent[last] = [parent[last]]
    return doc


_TEXT_OPS = st.lists(st.tuples(
    st.sampled_from(["truncate", "flip", "insert", "delete_line", "dup_line", "garbage_line",
                     "indent"]),
    st.integers(0, 2**31), st.binary(min_size=1, max_size=12)), min_size=1, max_size=4)


def mutate_text(blob: bytes, ops: list) -> bytes:
    """Byte- and line-level damage: truncations, flipped bytes, garbage, shuffled lines."""
    for op, where, junk in ops:
        if op == "truncate":
            blob = blob[:where % (len(blob) + 1)]
        elif op == "flip" and blob:
            i = where % len(blob)
            blob = blob[:i] + junk[:1] + blob[i + 1:]
        elif op == "insert":
            i = where % (len(blob) + 1)
            blob = blob[:i] + junk + blob[i:]
        else:
            lines = blob.split(b"\n")
            i = where % len(lines)
            if op == "delete_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(i, lines[i])
            elif op == "garbage_line":
                lines.insert(i, junk)
            else:
                lines[i] = b"  " + lines[i]
            blob = b"\n".join(lines)
    return blob


# --------------------------------------------------------------------------- config loader


@settings(max_examples=150, **FUZZ)
@given(doc=_CONFIG_DOCS)
def test_config_random_documents(work, doc):
    path = fresh(work, "config.yaml")
    path.write_text(dump(doc), encoding="utf-8")
    config, exc = outcome(load_config, path)
    note("loaded" if exc is None else "UserError")
    if exc is not None:
        check_user_error(exc, path)
        return
    # Correct output: what the file says, typed, with the documented defaults.
    assert VEHICLE_ID_PATTERN.match(config.vehicle_id) and config.vehicle_id == doc["vehicle_id"]
    assert config.dbc and all(isinstance(p, Path) and p.is_absolute() for p in config.dbc)
    assert config.mapping.is_absolute()
    mqtt = doc.get("mqtt")
    if config.mqtt is not None:
        assert config.mqtt.port == mqtt.get("port", 8883) and 1 <= config.mqtt.port <= 65535
        assert config.mqtt.reconnect_min_s <= config.mqtt.reconnect_max_s
        assert config.mqtt.tls_version in ("1.2", "1.3")
        assert not any(c in config.mqtt.topic_prefix for c in "+#")
    if config.can is not None:
        assert (config.can.capture is None) != (config.can.interface is None)
    assert config.logging.level in ("debug", "info", "warning", "error")
    assert config.policy.max_messages_per_s >= 0.1 and config.policy.heartbeat_s >= 1


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_config_structural_mutations_of_the_demo(work, data):
    doc = mutate(load_demo(DEMO_CONFIG), data)
    path = fresh(work, "demo.yaml")
    path.write_text(dump(doc), encoding="utf-8")
    config, exc = outcome(load_config, path)
    note("loaded" if exc is None else "UserError")
    if exc is not None:
        check_user_error(exc, path)
    else:
        assert config.file == path and config.vehicle_id


@settings(max_examples=150, **FUZZ)
@given(ops=_TEXT_OPS)
def test_config_byte_mutations_of_the_demo(work, ops):
    path = fresh(work, "demo.yaml")
    path.write_bytes(mutate_text(DEMO_CONFIG.read_bytes(), ops))
    config, exc = outcome(load_config, path)
    if exc is not None:
        check_user_error(exc, path)


@settings(max_examples=60, **FUZZ)
@given(blob=st.binary(max_size=600) | st.binary(max_size=64).map(lambda b: b * 50))
def test_config_and_mapping_binary_garbage(work, blob):
    for loader, name in ((load_config, "c.yaml"), (load_mapping, "m.yaml")):
        path = fresh(work, name)
        path.write_bytes(blob)
        _, exc = outcome(loader, path)
        if exc is not None:
            check_user_error(exc, path)


_BASE = "vehicle_id: V1\ndbc: a.dbc\nmapping: m.yaml\n"
_MAPPING_HEAD = ("signals:\n  Vehicle.Body.Hood.IsOpen:\n    message: BodyStatus\n"
                 "    signal: Hood\n    values: {OPEN: true, CLOSED: false}\n")


def _deep(levels: int, kind: str) -> str:
    if kind == "flow-list":
        return "[" * levels + "1" + "]" * levels
    if kind == "flow-map":
        return "{a: " * levels + "1" + "}" * levels
    if kind == "block-map":
        return "\n" + "".join("  " * (i + 1) + "a:\n" for i in range(levels)) + \
            "  " * (levels + 1) + "b: 1"
    return "\n" + "".join("  " * (i + 1) + "-\n" for i in range(levels)) + \
        "  " * (levels + 1) + "- 1"


def _bomb(levels: int = 9, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines)


def _merge_bomb(levels: int = 9, width: int = 10) -> str:
    lines = ["    m0: &m0 {" + ", ".join(f"k{j}: 1" for j in range(width)) + "}"]
    for i in range(1, levels):
        lines.append(f"    m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * width) + "]}")
    return "\n".join(lines)


_HOSTILE = {
    **{f"deep-{kind}-{n}": f"{_BASE}logging: {_deep(n, kind)}\n"
       for kind in ("flow-list", "flow-map", "block-map", "block-list") for n in (100, 1000)},
    "deep-top-5000": "[" * 5000 + "]" * 5000 + "\n",
    "deep-policy-deadband": _BASE + "policy:\n  deadband: " + _deep(1000, "flow-map") + "\n",
    "deep-dbc-list": "vehicle_id: V\nmapping: m\ndbc: " + _deep(1000, "flow-list") + "\n",
    "huge-string-value": _BASE.replace("V1", "V" * (2 * 1024 * 1024)),
    "huge-string-key": _BASE + "x" * (2 * 1024 * 1024) + ": 1\n",
    "huge-quoted-key": _BASE + '"' + "x" * 100000 + '": 1\n',
    "huge-file": _BASE + "#" * (5 * 1024 * 1024),
    "many-keys": _BASE + "".join(f"k{i}: {i}\n" for i in range(10000)),
    "nul-byte": _BASE + "logging: {level: \x00}\n",
    "nul-escaped": _BASE + 'logging: {level: "inf\\0o"}\n',
    "nul-path": _BASE.replace("a.dbc", '"a\\0.dbc"'),
    "bom": "\ufeff" + _BASE,
    "crlf": _BASE.replace("\n", "\r\n"),
    "cr-only": _BASE.replace("\n", "\r"),
    "tabs": _BASE + "can:\n\tinterface: x\n",
    "billion-laughs": _BASE + _bomb() + "\n",
    "billion-laughs-in-value": _BASE + "policy:\n  immediate: &x [a, b]\n" + "logging: " +
                                "{level: " + "[" * 5 + "*x" + "]" * 5 + "}\n",
    "laughs-under-known-key": "vehicle_id: V\nmapping: m\ndbc: &d [a, b, c, d, e, f, g, h, i]\n"
                              "policy: {deadband: {a: &e [*d, *d, *d, *d, *d, *d, *d, *d]}}\n",
    "merge-bomb": _BASE + "policy:\n  deadband:\n" + _merge_bomb() + "\n",
    "recursive-alias": _BASE + "can: &a {interface: x, channel: *a}\n",
    "recursive-list": _BASE + "dbc2: &l [*l]\n",
    "alias-undefined": _BASE + "logging: *nope\n",
    "anchor-only": "&a\n",
    "python-tag": _BASE + "logging: !!python/object/apply:os.system ['true']\n",
    "unknown-tag": _BASE + "logging: !custom {level: info}\n",
    "binary-tag": _BASE + "logging: {level: !!binary aGVsbG8=}\n",
    "set-tag": _BASE + "logging: !!set {a, b}\n",
    "timestamp": _BASE + "logging: {level: 2001-12-14t21:59:43.10-05:00}\n",
    "documents": _BASE + "---\n" + _BASE,
    "directive": "%YAML 1.1\n%TAG ! tag:x,2000:\n---\n" + _BASE,
    "utf16": None,  # written as UTF-16 below
    "invalid-utf8": None,
    "empty": "",
    "only-comment": "# nothing\n",
    "scalar": "42\n",
    "list": "- a\n- b\n",
    "complex-key": _BASE + "? [a, b]\n: 1\n",
    "mapping-key": _BASE + "{a: 1}: 2\n",
    "float-key": _BASE + "1.5: x\n",
    "null-key": _BASE + "~: x\n",
    "dup-keys": _BASE + "vehicle_id: V2\n",
    "nan-numbers": _BASE + "logging: {stats_interval_s: .nan}\npolicy: {heartbeat_s: -.inf}\n",
    "surrogate-escape": _BASE + 'logging: {level: "\\ud800"}\n',
    "big-int-in-range": _BASE + "mqtt: {host: h, port: 123456789012345678901234567890, ca: a, "
                                "cert: b, key: c}\n",
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_config_hostile_yaml_is_bounded(work, name):
    """Deep nesting, huge strings, bombs, tags, encodings: an answer (no hang) and little
    memory (aliases must not be expanded into copies)."""
    path = fresh(work, f"{name}.yaml")
    text = _HOSTILE[name]
    if name == "utf16":
        path.write_bytes(_BASE.encode("utf-16"))
    elif name == "invalid-utf8":
        path.write_bytes(_BASE.encode() + b"logging: {level: \xc3\x28}\n")
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for loader in (load_config,):   # the mapping loader: test_vehicle_with_hostile_mapping
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
        _, exc = outcome(loader, path, limit=10)       # a hang fails; speed is not judged
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        if exc is not None:
            check_user_error(exc, path)
        assert grown < 256 * 1024, f"{name}: peak memory grew by {grown / 1024:.0f} MiB"


# --------------------------------------------------------------------------- mapping loader

_DB = load_dbcs([DEMO_DBC])
_MESSAGE_NAMES = sorted(_DB.by_name)
_SIGNAL_NAMES = sorted({s.name for m in _DB.by_name.values() for s in m.signals})
_CHOICE_NAMES = sorted({str(name) for m in _DB.by_name.values() for s in m.signals
                        for name in (s.choices or {}).values()})
_VSS = sorted(KNOWN_VSS) + ["Vehicle.Custom.Thing", "Vehicle.A1.b_2"]

# Plausible mapping values: DBC names, ids, choices, numbers at the edges, plus anything.
_MAPPING_VALUES = st.one_of(
    st.sampled_from(_MESSAGE_NAMES + _SIGNAL_NAMES + _CHOICE_NAMES),
    st.sampled_from(sorted(m.frame_id for m in _DB.by_name.values())),
    st.integers(-3, 300), st.floats(), st.sampled_from([1e308, -1e308, 5e-324, 0.0]),
    st.lists(st.integers(-2, 2**32) | st.floats(), max_size=4),
    st.dictionaries(st.sampled_from(_CHOICE_NAMES) | st.integers(-1, 300) | _WEIRD_TEXT,
                    st.booleans() | st.integers(-5, 5) | st.floats() | _WEIRD_TEXT | _VALUES,
                    max_size=4),
    _VALUES,
)
_MAPPING_KEYS = st.sampled_from(["message", "signal", "scale", "offset", "invalid", "values",
                                 "mux", "timeout_ms", "decimals"]) | _KEYS
_SIGNAL_ENTRY = st.dictionaries(_MAPPING_KEYS, _MAPPING_VALUES, max_size=7)


def _dbc_entry(message, sig) -> st.SearchStrategy:
    """A mapping entry for one real DBC signal, with plausible (and some wrong) options."""
    choices = [str(name) for name in (sig.choices or {}).values()]
    mux_signal = (message.get_signal_by_name(sig.multiplexer_signal)
                  if sig.multiplexer_ids else None)
    mux_names = [str(n) for n in ((mux_signal.choices or {}).values() if mux_signal else ())]
    optional = {
        "scale": st.sampled_from([1, 1000, 0.001, -1, 0, 1e300]) | st.floats(-1e3, 1e3),
        "offset": st.sampled_from([0, -40, 1e300]) | st.floats(-1e3, 1e3),
        "invalid": st.lists(st.integers(0, 2**min(sig.length, 32) - 1) | st.floats(), max_size=3),
        "timeout_ms": st.integers(0, 10**6), "decimals": st.integers(-1, 13),
        "mux": st.sampled_from(list(sig.multiplexer_ids or [0]) + mux_names + ["Nope", 99]),
        "values": st.dictionaries(
            st.sampled_from(choices + ["NOPE"]) if choices else st.integers(0, 3),
            st.booleans() | st.booleans() | st.integers(0, 9) | st.sampled_from(["on", 1.5]),
            min_size=1, max_size=4),
    }
    return st.fixed_dictionaries(
        {"message": st.sampled_from([message.name, message.frame_id]), "signal": st.just(sig.name)},
        optional=optional)


_DBC_ENTRIES = st.sampled_from([(m, s) for m in _DB.by_name.values() for s in m.signals
                                if not s.is_multiplexer]).flatmap(lambda ms: _dbc_entry(*ms))
_PLAUSIBLE_MAPPING = st.fixed_dictionaries(
    {"signals": st.dictionaries(st.sampled_from(_VSS), _DBC_ENTRIES, min_size=1, max_size=6)},
    optional={"stale_factor": st.floats(0, 10) | st.integers(0, 10),
              "default_timeout_ms": st.integers(0, 10**6)})
_MAPPING_DOCS = st.one_of(
    _PLAUSIBLE_MAPPING, _PLAUSIBLE_MAPPING, _PLAUSIBLE_MAPPING,
    _VALUES,
    st.fixed_dictionaries(
        {"signals": st.dictionaries(st.sampled_from(_VSS) | _WEIRD_TEXT | _KEYS,
                                    _SIGNAL_ENTRY | _VALUES, max_size=5)},
        optional={"stale_factor": _MAPPING_VALUES, "default_timeout_ms": _MAPPING_VALUES}),
)


def vehicle_config(folder: Path, mapping: Path, dbc: Path = DEMO_DBC) -> Path:
    config = folder / "vehicle.yaml"
    config.write_text(f"vehicle_id: VIN1\ndbc: [{json.dumps(str(dbc))}]\n"
                      f"mapping: {json.dumps(str(mapping))}\n", encoding="utf-8")
    return config


def check_vehicle(config: Path, *blamed: Path, frames: int = 30, seed: int = 0) -> None:
    """load_vehicle gives a vehicle (that decodes random frames) or a one-line UserError."""
    vehicle, exc = outcome(load_vehicle, config)
    note("vehicle loaded" if exc is None else "vehicle: UserError")
    if exc is not None:
        check_user_error(exc, *blamed)
        return
    pipeline = SignalPipeline(vehicle.decoder())
    keys = vehicle.decoder().frame_keys
    rng = random.Random(seed)
    with time_limit(10):
        for i in range(frames):
            key = rng.choice(keys)
            msg = can.Message(timestamp=i * 0.05, arbitration_id=key & 0x1FFFFFFF,
                              is_extended_id=bool(key & 0x80000000),
                              data=bytes(rng.randrange(256) for _ in range(rng.choice(
                                  [8, 8, 8, 4, 12, 64, 0]))), check=False)
            for change in pipeline.feed(msg):
                assert change.quality in QUALITIES
                assert (change.value is None) == (change.quality != VALID)
                if change.value is not None:
                    note(f"change: {change.quality}")
                    if KNOWN_VSS.get(change.path) == "bool":
                        assert type(change.value) is bool, change
                    elif isinstance(change.value, float):
                        assert math.isfinite(change.value), change
        pipeline.tick(frames * 0.05 + 1000)


@settings(max_examples=120, **FUZZ)
@given(doc=_MAPPING_DOCS)
def test_mapping_random_documents(work, doc):
    path = fresh(work, "mapping.yaml")
    path.write_text(dump(doc), encoding="utf-8")
    mapping, exc = outcome(load_mapping, path)
    note("mapping loaded" if exc is None else "mapping: UserError")
    if exc is not None:
        check_user_error(exc, path)
        return
    assert mapping.signals and mapping.stale_factor >= 1
    for spec in mapping.signals:
        assert isinstance(spec.path, str) and spec.path.startswith("Vehicle.")
        assert isinstance(spec.message, (str, int)) and isinstance(spec.signal, str)
        assert math.isfinite(spec.scale) and math.isfinite(spec.offset)
    check_vehicle(vehicle_config(path.parent, path), path)


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_mapping_structural_mutations_bound_to_the_dbc(work, data):
    doc = mutate(load_demo(DEMO_MAPPING), data, _MAPPING_VALUES)
    path = fresh(work, "mapping.yaml")
    path.write_text(dump(doc), encoding="utf-8")
    check_vehicle(vehicle_config(path.parent, path), path,
                  seed=data.draw(st.integers(0, 1000), label="seed"))


@settings(max_examples=80, **FUZZ)
@given(ops=_TEXT_OPS)
def test_mapping_byte_mutations_bound_to_the_dbc(work, ops):
    path = fresh(work, "mapping.yaml")
    path.write_bytes(mutate_text(DEMO_MAPPING.read_bytes(), ops))
    check_vehicle(vehicle_config(path.parent, path), path)


# The YAML layer is shared with the config (test_config_hostile_yaml_is_bounded); these put
# hostile structures where the mapping loader and the decoder look.
_HOSTILE_MAPPINGS = {
    "deep-values": _MAPPING_HEAD.replace("{OPEN: true, CLOSED: false}", _deep(1000, "flow-map")),
    "deep-invalid": _MAPPING_HEAD + "    invalid: " + _deep(1000, "flow-list") + "\n",
    "deep-signals": "signals: " + _deep(1000, "block-map") + "\n",
    "laughs-in-values": _bomb().replace("a0:", "x0:") + "\n" + _MAPPING_HEAD.replace(
        "{OPEN: true, CLOSED: false}", "{OPEN: *a8}"),
    "laughs-in-invalid": "x: &x [1, 2, 3]\n" + _MAPPING_HEAD + "    invalid: [*x, *x, *x]\n",
    "merge-in-signal": "signals:\n  Vehicle.Body.Hood.IsOpen: &h\n    message: BodyStatus\n"
                       "    signal: Hood\n    values: {OPEN: true, CLOSED: false}\n"
                       "  Vehicle.Body.Trunk.Rear.IsOpen: {<<: *h, signal: Trunk}\n",
    "merge-bomb": "signals:\n  Vehicle.X.Y:\n    message: Cluster\n    signal: RangeKm\n"
                  "    values:\n" + _merge_bomb().replace("    m", "      m") + "\n",
    "recursive-values": _MAPPING_HEAD.replace("{OPEN: true, CLOSED: false}", "&v {OPEN: *v}"),
    "nul-message": _MAPPING_HEAD.replace("message: BodyStatus", 'message: "Body\\0Status"'),
    "huge-signal-name": _MAPPING_HEAD.replace("signal: Hood", "signal: " + "H" * 2_000_000),
    "many-signals": "signals:\n" + "".join(
        f"  Vehicle.X.S{i}:\n    message: Cluster\n    signal: RangeKm\n" for i in range(3000)),
    "binary-tag": _MAPPING_HEAD.replace("signal: Hood", "signal: !!binary SG9vZA=="),
    "timestamp": _MAPPING_HEAD.replace("signal: Hood", "signal: 2001-12-14"),
    "python-tag": _MAPPING_HEAD.replace("signal: Hood", "signal: !!python/name:os.system"),
    "float-message": _MAPPING_HEAD.replace("message: BodyStatus", "message: 688.0"),
    "bool-message": _MAPPING_HEAD.replace("message: BodyStatus", "message: true"),
    "big-message-id": _MAPPING_HEAD.replace("message: BodyStatus", "message: 0xFFFFFFFFFFFF"),
    "null-values": _MAPPING_HEAD.replace("{OPEN: true, CLOSED: false}", "{OPEN: null}"),
}


@pytest.mark.parametrize("name", sorted(_HOSTILE_MAPPINGS))
def test_vehicle_with_hostile_mapping(work, name):
    path = fresh(work, "mapping.yaml")
    path.write_text(_HOSTILE_MAPPINGS[name], encoding="utf-8")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check_vehicle(vehicle_config(path.parent, path), path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 256 * 1024


# -- known bugs: config and mapping -----------------------------------------------------------

_HUGE = "0x" + "f" * 4000          # a 4816-digit integer: str() of it raises ValueError


@pytest.mark.parametrize("loader, text", [
    ("config", f"vehicle_id: {_HUGE}\ndbc: a\nmapping: m\n"),
    ("config", f"vehicle_id: V\ndbc: {_HUGE}\nmapping: m\n"),
    ("config", "vehicle_id: " + ":".join(["59"] * 3000) + "\ndbc: a\nmapping: m\n"),
    ("config", _BASE + f"mqtt: {{host: h, port: {_HUGE}, ca: a, cert: b, key: c}}\n"),
    ("config", _BASE + f"policy: {{deadband: {{'*': {_HUGE}}}}}\n"),
    ("config", _BASE + "policy: {heartbeat_s: 0x" + "f" * 300 + "}\n"),
    ("mapping", _MAPPING_HEAD + f"    decimals: {_HUGE}\n"),
    ("mapping", _MAPPING_HEAD + "    scale: 0x" + "f" * 300 + "\n"),
    ("mapping", "stale_factor: 0x" + "f" * 300 + "\n" + _MAPPING_HEAD),
], ids=["vehicle_id", "dbc", "base60", "port", "deadband", "heartbeat", "decimals", "scale",
        "stale_factor"])
def test_huge_integer_gives_one_line_error(work, loader, text):
    path = fresh(work, f"{loader}.yaml")
    path.write_text(text)
    _, exc = outcome(load_config if loader == "config" else load_mapping, path)
    assert exc is not None
    check_user_error(exc, path)


@pytest.mark.parametrize("loader, text", [
    ("mapping", 'signals:\n  "Veh\\nicle":\n    message: B\n    signal: H\n'),
    ("mapping", 'signals:\n  Vehicle.Body.X:\n    message: B\n    signal: H\n'
                '    values: {"a\\nb": [1]}\n'),
    ("mapping", 'signals:\n  Vehicle.Body.X:\n    message: B\n    signal: H\n'
                '    values: {"a\\u2028b": [1]}\n'),
    ("config", _BASE + 'policy: {deadband: {"a\\nb": x}}\n'),
    ("vehicle", 'signals:\n  Vehicle.Body.X:\n    message: "Body\\nStatus"\n    signal: Hood\n'),
    ("vehicle", 'signals:\n  Vehicle.Body.Hood.IsOpen:\n    message: BodyStatus\n'
                '    signal: Hood\n    values: {"OP\\nEN": true}\n'),
], ids=["vss-key", "values-key", "values-key-u2028", "deadband-key", "message-name",
        "values-name"])
def test_key_with_line_break_gives_one_line_error(work, loader, text):
    path = fresh(work, "mapping.yaml" if loader == "vehicle" else f"{loader}.yaml")
    path.write_text(text)
    if loader == "vehicle":
        _, exc = outcome(load_vehicle, vehicle_config(path.parent, path))
    else:
        _, exc = outcome(load_config if loader == "config" else load_mapping, path)
    assert exc is not None
    check_user_error(exc, path)


@pytest.mark.parametrize("loader, text", [
    ("config", 'vehicle_id: "VIN1\\n"\ndbc: a\nmapping: m\n'),
    ("mapping", 'signals:\n  "Vehicle.Body.X\\n":\n    message: B\n    signal: H\n'),
], ids=["vehicle_id", "vss_path"])
def test_trailing_newline_is_not_a_valid_name(work, loader, text):
    path = fresh(work, f"{loader}.yaml")
    path.write_text(text)
    _, exc = outcome(load_config if loader == "config" else load_mapping, path)
    assert exc is not None
    check_user_error(exc, path)


# --------------------------------------------------------------------------- DBC loader


def check_dbc(path: Path) -> None:
    vdb, exc = outcome(load_dbcs, [path])
    note("dbc loaded" if exc is None else "dbc: ConfigError")
    if exc is None:
        assert vdb.by_key and vdb.by_name
        for warning in vdb.warnings:
            assert one_line(warning) and str(path) in warning, warning
        return
    assert isinstance(exc, ConfigError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert one_line(message), repr(message)
    assert str(path) in message, message


# The real DBCs (opendbc) of ../shared/data; skipped only when that folder is missing.
_DBC_FILES = [DEMO_DBC] + (SHARED_DBCS or [pytest.param(
    SHARED / "missing.dbc", marks=pytest.mark.skip(reason=f"{SHARED} is missing"))])


@pytest.mark.parametrize("dbc", _DBC_FILES, ids=lambda p: p.name)
def test_dbc_truncated_every_n_bytes(work, dbc):
    data = dbc.read_bytes()
    step = max(97, len(data) // 8)     # ~8 cuts per file, at least every 97 bytes
    for cut in list(range(0, len(data), step)) + [len(data) - 1, len(data) - 2]:
        path = fresh(work, dbc.name)
        path.write_bytes(data[:cut])
        check_dbc(path)


@pytest.mark.parametrize("dbc", _DBC_FILES, ids=lambda p: p.name)
def test_dbc_byte_and_line_mutations(work, dbc):
    data = dbc.read_bytes()
    examples = 60 if dbc == DEMO_DBC else 8

    @settings(max_examples=examples, **FUZZ)
    @given(ops=_TEXT_OPS)
    def run(ops):
        path = fresh(work, dbc.name)
        path.write_bytes(mutate_text(data, ops))
        check_dbc(path)

    run()


@settings(max_examples=60, **FUZZ)
@given(blob=st.binary(max_size=400), prefix=st.sampled_from(
    [b"", b'VERSION ""\n', b"BO_ 1 M: 8 X\n SG_ ", b"BO_ ", b"NS_ :\nBS_:\nBU_: A\n"]))
def test_dbc_random_bytes(work, blob, prefix):
    path = fresh(work, "random.dbc")
    path.write_bytes(prefix + blob)
    check_dbc(path)


@settings(max_examples=60, **FUZZ)
@given(ops=_TEXT_OPS, seed=st.integers(0, 1000))
def test_mutated_dbc_bound_to_the_demo_mapping(work, ops, seed):
    path = fresh(work, "demo_vehicle.dbc")
    path.write_bytes(mutate_text(DEMO_DBC.read_bytes(), ops))
    check_vehicle(vehicle_config(path.parent, DEMO_MAPPING, path), path, DEMO_MAPPING,
                  seed=seed)


def test_dbc_not_a_file_and_empty(work):
    for blob in (b"", b"\n", b"\x00" * 100, b"\xff\xfe" + "BO_".encode("utf-16-le")):
        path = fresh(work, "x.dbc")
        path.write_bytes(blob)
        check_dbc(path)
    check_dbc(work / "missing.dbc")
    folder = fresh(work, "dir.dbc")
    folder.mkdir()
    check_dbc(folder)


# A DBC that fails cantools' strict checks (overlapping signals), so it loads non-strictly.
_NON_STRICT_DBC = """VERSION ""
NS_ :
BS_:
BU_: A
BO_ 100 M: 8 A
 SG_ One : 0|8@1+ (1,0) [0|255] "" A
 SG_ Two : 4|8@1+ (1,0) [0|255] "" A
 SG_ Three : 16|8@1+ (1,0) [0|255] "" A
"""


def test_truncated_non_strict_dbc_error_names_the_file(work):
    path = fresh(work, "overlap.dbc")
    path.write_text(_NON_STRICT_DBC)
    assert load_dbcs([path]).warnings            # loads, non-strictly
    path.write_text(_NON_STRICT_DBC[:-30])       # cut inside the last SG_ line
    _, exc = outcome(load_dbcs, [path])
    assert isinstance(exc, ConfigError)
    assert str(path) in str(exc), str(exc)


# --------------------------------------------------------------------------- capture readers



def read_capture(path: Path, fmt: str | None = None, channel: str | None = None,
                 lines: int | None = None) -> tuple[list[can.Message], Any]:
    """All frames of ``path``; asserts the reader contract on the way."""
    try:
        reader = open_capture(path, fmt, channel)
    except UserError as exc:
        check_user_error(exc, path)
        return [], None
    if lines is not None:
        report = reader._bad

        def guarded(line: int, reason: str) -> None:
            report(line, reason)
            if reader.malformed > lines + 2:
                raise Runaway(f"{reader.malformed} malformed lines reported for a file of "
                              f"{lines} lines: {reader.first_malformed}")

        reader._bad = guarded
    with time_limit(20), reader:
        frames = []
        for msg in reader:
            assert isinstance(msg, can.Message), type(msg)
            frames.append(msg)
    assert reader.frames == len(frames)
    note(f"{reader.format}: {'frames' if frames or reader.other_channel else 'no frames'}"
          f"{', malformed' if reader.malformed else ''}{', error' if reader.error else ''}")
    summary = reader.malformed_summary()
    # Nothing to report exactly when nothing was skipped and nothing failed.
    assert (summary is None) == (reader.malformed == 0 and not reader.error), \
        (summary, reader.malformed, reader.error)
    assert summary is None or (one_line(summary) and str(path) in summary), repr(summary)
    for msg in frames:
        assert 0 <= msg.arbitration_id <= 0x1FFFFFFF, msg
        assert len(msg.data) <= 64, msg
        if channel is not None:
            assert msg.channel == channel
    # Whatever a reader yields, the decoder takes without raising.
    pipeline = SignalPipeline(_VEHICLE.decoder())
    with time_limit(20):
        for msg in frames:
            pipeline.feed(msg)
    return frames, reader


def _line_count(blob: bytes) -> int:
    return blob.count(b"\n") + blob.count(b"\r") + 1


_SUFFIXES = {"candump": [".log", ".candump", ".log.gz"], "asc": [".asc", ".log", ".asc.gz"],
             "trc": [".trc", ".trc.gz"]}


@settings(max_examples=150, **FUZZ)
@given(data=st.data(), kind=st.sampled_from(["candump", "asc", "trc", "soup"]),
       ending=st.sampled_from(["\n", "\n", "\r\n", "\r"]),
       channel=st.none() | st.none() | st.sampled_from(["can0", "1", "0"]))
def test_capture_line_soups(work, data, kind, ending, channel):
    if kind == "soup":    # any mix of formats and garbage, read as any format
        lines = data.draw(_LINES, label="lines")
        suffix = data.draw(st.sampled_from([s for v in _SUFFIXES.values() for s in v]))
        fmt = data.draw(st.none() | st.sampled_from(["candump", "asc", "trc"]), label="fmt")
    else:
        lines = data.draw(_format_soup(kind), label="lines")
        suffix = data.draw(st.sampled_from(_SUFFIXES[kind]), label="suffix")
        fmt = None
    blob = _soup(lines, ending)
    path = fresh(work, f"capture{suffix}")
    path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
    read_capture(path, fmt, channel, lines=_line_count(blob))


@settings(max_examples=120, **FUZZ)
@given(blob=st.binary(max_size=2000),
       prefix=st.sampled_from([b"", b"date Mon Jan 1 00:00:00.000 am 2024\nbase hex  timestamps"
                               b" absolute\n", b";$FILEVERSION=2.1\n;$STARTTIME=1\n;$COLUMNS="
                               b"N,O,T,B,I,d,R,L,D\n", b"(1.0) can0 123#", b"LOGG"]),
       suffix=st.sampled_from([".log", ".asc", ".trc", ".blf", ".log.gz", ".asc.gz", ".trc.gz",
                               ".blf.gz"]))
def test_capture_random_bytes(work, blob, prefix, suffix):
    path = fresh(work, f"capture{suffix}")
    data = prefix + blob
    path.write_bytes(data)
    read_capture(path, lines=_line_count(data))


def _blf_bytes(frames: list[can.Message], folder: Path) -> bytes:
    path = fresh(folder, "w.blf")
    with can.BLFWriter(str(path)) as writer:
        for msg in frames:
            writer.on_message_received(msg)
    return path.read_bytes()


_BLF_FRAMES = st.lists(st.builds(
    lambda t, i, ext, data, fd, err, rtr, ch: can.Message(
        timestamp=1_700_000_000 + t, arbitration_id=i if ext else i & 0x7FF, is_extended_id=ext,
        data=data[:64 if fd else 8], is_fd=fd, is_error_frame=err, is_remote_frame=rtr and not fd,
        channel=ch, check=False),
    st.floats(0, 1000), st.integers(0, 0x1FFFFFFF), st.booleans(), st.binary(max_size=64),
    st.booleans(), st.booleans(), st.booleans(), st.integers(0, 3)), max_size=30)


@settings(max_examples=60, **FUZZ)
@given(frames=_BLF_FRAMES, ops=_TEXT_OPS, compress=st.booleans(), damage=st.booleans())
def test_capture_blf_written_then_damaged(work, frames, ops, compress, damage):
    blob = _blf_bytes(frames, work)
    if damage:
        blob = mutate_text(blob, ops)
    path = fresh(work, "capture.blf.gz" if compress else "capture.blf")
    path.write_bytes(gzip.compress(blob) if compress else blob)
    got, reader = read_capture(path)
    if not damage:
        assert len(got) == len(frames) and reader.error is None


def test_capture_missing_directory_and_unknown_format(work):
    for name in ("missing.log", "missing.blf", "x.txt", "noext"):
        read_capture(work / name)
    folder = fresh(work, "dir.log")
    folder.mkdir()
    read_capture(folder)
    path = fresh(work, "x.log")
    path.write_text("(1.0) can0 123#00\n")
    with pytest.raises(UserError) as info:
        open_capture(path, "bogus")
    check_user_error(info.value, path)


# -- known bugs: damaged gzip captures ---------------------------------------------------------

_GOOD_CANDUMP_BYTES = b"(1.0) can0 123#DEADBEEF\n" * 200
_GOOD_ASC_BYTES = (b"date Mon Jan 5 10:00:00.000 am 2026\nbase hex  timestamps absolute\n"
             + b"   0.100000 1  123  Rx   d 2 01 02\n" * 200)
_GOOD_TRC_BYTES = (b";$FILEVERSION=2.1\n;$STARTTIME=1\n;$COLUMNS=N,O,T,B,I,d,R,L,D\n"
             + b"1) 1.0 DT 1 0123 Rx - 2 01 02\n" * 200)


def _damaged(blob: bytes, how: str) -> bytes:
    packed = gzip.compress(blob)
    if how == "truncated":
        return packed[:len(packed) // 2]
    if how == "corrupt":
        return packed[:20] + b"\xff" * 16 + packed[36:]
    return b"not gzip at all " * 8


@pytest.mark.parametrize("how", ["truncated", "corrupt", "not-gzip"])
def test_damaged_gzip_candump_does_not_raise(work, how):
    path = fresh(work, "drive.log.gz")
    path.write_bytes(_damaged(_GOOD_CANDUMP_BYTES, how))
    read_capture(path, lines=400)


@pytest.mark.parametrize("fmt, how", [("asc", "truncated"), ("asc", "corrupt"),
                                      ("trc", "truncated"), ("trc", "corrupt")])
def test_damaged_gzip_asc_trc_terminates(work, fmt, how):
    path = fresh(work, f"drive.{fmt}.gz")
    path.write_bytes(_damaged(_GOOD_ASC_BYTES if fmt == "asc" else _GOOD_TRC_BYTES, how))
    read_capture(path, lines=400)


# --------------------------------------------------------------------------- decoder + state

_VEHICLE = load_vehicle(DEMO_CONFIG)
_PATHS = _VEHICLE.decoder().paths
_MAPPED = [(m.frame_id, m.is_extended_frame, m.length) for m in
           (_VEHICLE.database.find(spec.message) for spec in _VEHICLE.mapping.signals)]
_BOOLEAN = {p for p in _PATHS if KNOWN_VSS.get(p) == "bool"}
_PERCENT = {p for p in _PATHS if p.endswith(("RelativeLevel", "Window.Position",
                                             "Sunroof.Position"))}


def _numeric_bounds() -> dict[str, tuple[float, float]]:
    """Published range of every numeric path, from the DBC range and the mapping's scale."""
    bounds = {}
    for spec in _VEHICLE.mapping.signals:
        if spec.values is not None:
            continue
        message = _VEHICLE.database.find(spec.message)
        sig = message.get_signal_by_name(spec.signal)
        ends = [sig.minimum * spec.scale + spec.offset, sig.maximum * spec.scale + spec.offset]
        bounds[spec.path] = (min(ends), max(ends))
    return bounds


_BOUNDS = _numeric_bounds()

_TIMESTAMPS = st.one_of(st.floats(-1e12, 1e12, allow_nan=False), st.floats(0, 100),
                        st.sampled_from([0.0, -0.0, 1e-9, 1_700_000_000.0, 5e-324]))
_FRAME = st.one_of(
    # A mapped id with a plausible length: reaches the converters.
    st.builds(lambda m, data, t, fd: can.Message(
        timestamp=t, arbitration_id=m[0], is_extended_id=m[1], data=data, is_fd=fd, check=False),
        st.sampled_from(_MAPPED), st.binary(min_size=8, max_size=8)
        | st.sampled_from([4, 12, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
        _TIMESTAMPS, st.booleans()),
    # Anything: 11-bit ids above 0x7FF, extended, FD lengths, remote, error frames.
    st.builds(lambda i, ext, data, t, fd, rtr, err: can.Message(
        timestamp=t, arbitration_id=i, is_extended_id=ext, data=data, is_fd=fd,
        is_remote_frame=rtr, is_error_frame=err, check=False),
        st.sampled_from([m[0] for m in _MAPPED]) | st.integers(0, 0x7FF)
        | st.integers(0x800, 0x1FFFFFFF) | st.integers(0x20000000, 2**32 - 1),
        st.booleans(), st.binary(max_size=64), _TIMESTAMPS, st.booleans(), st.booleans(),
        st.booleans()),
)
_OPS = st.lists(st.one_of(st.tuples(st.just("feed"), _FRAME),
                          st.tuples(st.just("tick"), _TIMESTAMPS)), min_size=1, max_size=60)


def check_change(change) -> None:
    assert change.path in _PATHS
    assert change.quality in QUALITIES
    if change.quality != VALID:
        assert change.value is None, change
        return
    value = change.value
    assert value is not None, change
    if change.path in _BOOLEAN:
        assert type(value) is bool, change
        return
    assert isinstance(value, (int, float)) and not isinstance(value, bool), change
    assert math.isfinite(value), change
    if change.path in _PERCENT:
        assert 0 <= value <= 100, change
    lo, hi = _BOUNDS[change.path]
    slack = 1e-6 * max(1.0, abs(lo), abs(hi))
    assert lo - slack <= value <= hi + slack, (change, lo, hi)


@settings(max_examples=200, **FUZZ)
@given(ops=_OPS)
def test_pipeline_random_frames_and_times(ops):
    pipeline = SignalPipeline(_VEHICLE.decoder())
    with time_limit(10):
        for op, arg in ops:
            changes = pipeline.feed(arg) if op == "feed" else pipeline.tick(arg)
            for change in changes:
                check_change(change)
                note(f"change: {change.quality}")
            state = pipeline.state
            for i, path in enumerate(_PATHS):
                quality = state.qualities[i]
                assert quality is None or quality in QUALITIES
                if quality != VALID:
                    assert state.values[i] is None
        snapshot = pipeline.state.snapshot(arg if op == "tick" else arg.timestamp)
    assert set(snapshot) == set(_PATHS)
    for entry in snapshot.values():
        assert entry["quality"] in QUALITIES
        assert entry["age"] is None or entry["age"] >= 0
    counters = pipeline.decoder.counters
    assert counters.frames == sum(1 for op, _ in ops if op == "feed")


@settings(max_examples=100, **FUZZ)
@given(payloads=st.lists(st.tuples(st.sampled_from(_MAPPED), st.binary(min_size=8, max_size=8)),
                         min_size=1, max_size=40))
def test_pipeline_valid_frames_publish_expected_types(payloads):
    """Frames of the right id and length, in time order, never stale: every change is a
    well-typed value or an explicit invalid -- and it is what the DBC says."""
    pipeline = SignalPipeline(_VEHICLE.decoder())
    seen_valid = 0
    for n, ((frame_id, extended, length), data) in enumerate(payloads):
        msg = can.Message(timestamp=n * 0.01, arbitration_id=frame_id, is_extended_id=extended,
                          data=data[:length])
        for change in pipeline.feed(msg):
            check_change(change)
            seen_valid += change.quality == VALID
            assert change.quality != STALE
    assert seen_valid or all(q in (None, INVALID) for q in pipeline.state.qualities)


# --------------------------------------------------------------------------- inbound MQTT


def test_agent_subscribes_to_exactly_one_topic(work, pki, broker):
    """The agent's one subscription is its own snapshot-request topic (QoS 1, no-local), made by
    the uplink in one place; its one message handler is the request check
    (agent.uplink.requests, fuzzed in tests/test_snapshot.py). ``cmd.enabled: false``: none."""
    import agent.can.source
    import agent.service.daemon
    import agent.uplink.mqtt
    from agent.uplink.mqtt import Uplink
    from agent.uplink.outbox import Outbox

    for module in (agent.service.daemon, agent.can.source):
        source = inspect.getsource(module)
        assert "subscribe" not in source and "on_message" not in source, module.__name__
    source = inspect.getsource(agent.uplink.mqtt)
    assert source.count("subscribe(") == 1 and source.count("on_message =") == 1

    for enabled in (True, False):
        folder = fresh(work, "agent").parent
        config_path = folder / "agent.yaml"
        config_path.write_text(
            f"vehicle_id: VIN1\ndbc: [{DEMO_DBC}]\nmapping: {DEMO_MAPPING}\n"
            f"mqtt: {{host: 127.0.0.1, port: {broker.port}, ca: {pki / 'ca.crt'}, "
            f"cert: {pki / 'VIN1.crt'}, key: {pki / 'VIN1.key'}}}\n"
            f"cmd: {{enabled: {str(enabled).lower()}}}\n")
        config = load_config(config_path)
        with Outbox(folder / "outbox.db") as outbox:
            uplink = Uplink(config.mqtt, "VIN1", outbox, config.cmd)
            calls = []
            subscribe = uplink.client.subscribe
            uplink.client.subscribe = lambda *a, **k: (calls.append((a, k)), subscribe(*a, **k))[1]
            uplink.start()
            assert uplink.connected.wait(10), uplink.last_error
            uplink.stop()      # joins the network thread: the CONNACK handler has run to its end
            assert uplink.counters.connects == 1
            if enabled:
                [(args, kwargs)] = calls
                assert args == ("vehicles/VIN1/cmd/snapshot",)
                assert (kwargs["options"].QoS, kwargs["options"].noLocal) == (1, True)
                assert uplink.client.on_message == uplink._on_request
            else:
                assert calls == [] and uplink.client.on_message is None
                assert uplink.requests is None


@pytest.fixture(scope="module")
def cloud(tmp_path_factory) -> tuple[Path, Signer]:
    pki = tmp_path_factory.mktemp("cloud-pki") / "pki"
    init_pki(pki, ["VIN1", "VIN2"])
    return pki, Signer.from_file(pki / "VIN1.signing.key")


_ROGUE = Signer(ec.generate_private_key(ec.SECP256R1()))   # a key the JWKS does not know

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([2**63, 2**63 - 1])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(alphabet=_SAFE_CHARS, max_size=10),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(alphabet=_SAFE_CHARS, max_size=8), inner, max_size=4),
    max_leaves=10)
_SEQS = st.integers(1, 50) | st.integers(-3, 2**64) | st.sampled_from([0, MAX_SEQ, MAX_SEQ + 1])
_CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        "vid": st.sampled_from(["VIN1", "VIN2", "", "VIN1 ", "vin1"]) | _JSON,
        "seq": _SEQS | _JSON,
        "boot": st.integers(0, 9) | _JSON,
        "ts": st.integers(0, 2**45) | st.sampled_from([2**62, 10**30]) | _JSON,
        "signals": st.dictionaries(st.sampled_from(_PATHS) | st.text(max_size=5), _JSON,
                                   max_size=4) | _JSON,
        "quality": st.dictionaries(st.sampled_from(_PATHS), st.sampled_from(["invalid", "stale"])
                                   | _JSON, max_size=3) | _JSON,
        "age": st.dictionaries(st.sampled_from(_PATHS), _JSON, max_size=3) | _JSON,
        "kind": st.sampled_from(["event", "state", "status"]) | _JSON,
    },
).flatmap(lambda c: st.dictionaries(st.text(max_size=6), _JSON, max_size=2).map(
    lambda extra: {**extra, **c}))
_GOOD_CLAIMS = st.builds(
    lambda seq, kind, signals: {"vid": "VIN1", "seq": seq, "boot": 1, "ts": 1_700_000_000_000,
                                "signals": signals, "kind": kind},
    _SEQS, st.sampled_from(["event", "state"]),
    st.dictionaries(st.sampled_from(_PATHS), st.none() | st.booleans() | st.integers(0, 100),
                    max_size=4))
_B64 = st.binary(max_size=80).map(b64url_encode) | st.text(
    alphabet="ABCDEFabcdef0123456789-_+/=.", max_size=40)
_HEADER = st.fixed_dictionaries(
    {"alg": st.sampled_from(["ES256", "EdDSA", "none", "HS256", "RS256"])
     | st.text(alphabet=_SAFE_CHARS, max_size=6)
     | st.sampled_from(["ES\n256", "\r\n", "none\u2028", "\x85"]) | _JSON},
    optional={"kid": st.text(max_size=8) | _JSON, "typ": _JSON, "crit": _JSON})
_TOPICS = st.one_of(
    st.sampled_from(["vehicles/VIN1/events", "vehicles/VIN1/state", "vehicles/VIN1/status",
                     "vehicles/VIN1/metrics", "vehicles/VIN2/events", "vehicles/VIN1/other",
                     "vehicles/+/events", "vehicles/#", "vehicles/VIN1/events/extra",
                     "vehicles//events", "/vehicles/VIN1/events", "vehicles/VIN1", "", "/",
                     "vehicles/a b/state", "vehicles/VIN1/\u0000"]),
    st.builds(lambda vid, leaf: f"vehicles/{vid}/{leaf}",
              st.sampled_from(["VIN1", "VIN2", "x" * 65, "é", "+", "#"]) | st.text(max_size=8),
              st.sampled_from(["events", "state", "status", "metrics"]) | st.text(max_size=8)),
    st.text(max_size=64),
    st.integers(1000, 70000).map(lambda n: "vehicles/" + "a/" * (n // 2)),
)


def _payloads(signer: Signer) -> st.SearchStrategy:
    def signed(claims: dict, how: str) -> bytes:
        token = (_ROGUE if how == "rogue" else signer).sign(claims)
        if how == "spaces":
            return f"  {token}\n".encode()
        if how == "utf16":
            return token.encode("utf-16")
        if how == "tampered":
            head, body, sig = token.split(".")
            return f"{head}.{body}x.{sig}".encode()
        return token.encode()

    return st.one_of(
        st.binary(max_size=300),
        st.integers(MAX_PAYLOAD_BYTES - 2, MAX_PAYLOAD_BYTES + 4096).flatmap(
            lambda n: st.sampled_from([b"a", b"\xff", b"{", b"."]).map(lambda c: c * n)),
        _JSON.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"online", b"offline", b'{"status": "online"}', b"{}", b"[]", b"null",
                         b"\xef\xbb\xbfonline", b"{" * 100000, b"[" * 5000 + b"]" * 5000]),
        st.tuples(_B64, _B64, _B64).map(lambda p: ".".join(p).encode()),
        st.tuples(_HEADER.map(lambda h: b64url_encode(json.dumps(h).encode())),
                  _JSON.map(lambda v: b64url_encode(json.dumps(v).encode())), _B64)
        .map(lambda p: ".".join(p).encode()),
        st.builds(signed, _CLAIMS | _GOOD_CLAIMS,
                  st.sampled_from(["plain", "plain", "spaces", "utf16", "tampered", "rogue"])),
    )


def _aligned(signer: Signer) -> st.SearchStrategy:
    """(topic, payload) on the vehicle's own topic, validly signed; 0-2 claims damaged."""
    def build(claims: dict, leaf: str, damage: list, drop: list) -> tuple[str, bytes]:
        claims = {**claims, "kind": {"events": "event", "state": "state"}[leaf]}
        for name, value in damage:
            claims[name] = value
        for name in drop:
            claims.pop(name, None)
        return f"vehicles/VIN1/{leaf}", signer.sign(claims).encode()

    names = st.sampled_from(["vid", "seq", "boot", "ts", "signals", "quality", "age", "kind"])
    return st.builds(build, _GOOD_CLAIMS, st.sampled_from(["events", "state"]),
                     st.lists(st.tuples(names, _JSON), max_size=2),
                     st.lists(names, max_size=1) | st.just([]))


def check_record(record: Any, topic: str) -> None:
    assert isinstance(record, dict) and record.get("topic") == topic, record
    line = format_human(record)
    assert one_line(line), repr(line)
    json.dumps(record)
    if record.get("verified") is True:
        assert type(record["seq"]) is int and 1 <= record["seq"] <= MAX_SEQ, record
        assert type(record["vid"]) is str and record["vid"] == topic.split("/")[1], record
        assert record["kind"] == {"events": "event", "state": "state"}[topic.split("/")[2]]
        assert type(record["boot"]) is int and type(record["ts"]) is int
        assert isinstance(record["signals"], dict) and isinstance(record["quality"], dict)
        return
    assert record.get("verified") is False, record
    if "rejected" in record:
        reason = record["rejected"]
        assert isinstance(reason, str) and one_line(reason), repr(reason)
        assert not reason.startswith("internal error"), reason
        if "seq" in record:
            assert type(record["seq"]) is int
        return
    # Unsigned kinds: status and metrics, only on their own topics.
    assert record["kind"] in ("status", "metrics") and topic.endswith("/" + record["kind"])
    assert isinstance(record["vid"], str)


@settings(max_examples=150, **FUZZ)
@given(data=st.data())
def test_cloud_checker_never_raises_and_every_record_is_verified_or_rejected(cloud, data):
    pki, signer = cloud
    checker = MessageChecker(Verifier.from_jwks_file(pki / "jwks.json"))
    accepted: set[int] = set()
    for _ in range(data.draw(st.integers(1, 4), label="messages")):
        if data.draw(st.booleans(), label="aligned"):
            topic, payload = data.draw(_aligned(signer), label="aligned message")
        else:
            topic = data.draw(_TOPICS, label="topic")
            payload = data.draw(_payloads(signer), label="payload")
        record = checker.check(topic, payload, data.draw(st.booleans(), label="retained"))
        check_record(record, topic)
        note("verified" if record.get("verified") else
              record.get("rejected", record.get("kind", "?")).split(":")[0][:30])
        if record.get("verified"):
            assert record["seq"] not in accepted, "a seq was accepted twice"
            accepted.add(record["seq"])


@settings(max_examples=100, **FUZZ)
@given(claims=_GOOD_CLAIMS, leaf=st.sampled_from(["events", "state"]))
def test_cloud_checker_accepts_well_formed_tokens(cloud, claims, leaf):
    """Not vacuous: a well-typed token on the right topic is verified, once."""
    pki, signer = cloud
    checker = MessageChecker(Verifier.from_jwks_file(pki / "jwks.json"))
    claims["kind"] = {"events": "event", "state": "state"}[leaf]
    topic = f"vehicles/VIN1/{leaf}"
    token = signer.sign(claims).encode()
    record = checker.check(topic, token)
    check_record(record, topic)
    if 1 <= claims["seq"] <= MAX_SEQ:
        assert record["verified"] and record["seq"] == claims["seq"]
        again = checker.check(topic, token)
        assert again["verified"] is False and "duplicate" in again["rejected"]
    else:
        assert record["rejected"].startswith("bad claims: 'seq'")


def test_rejected_reason_is_one_line_even_for_a_hostile_alg(cloud):
    pki, _ = cloud
    checker = MessageChecker(Verifier.from_jwks_file(pki / "jwks.json"))
    header = b64url_encode(json.dumps({"alg": "x\nFAKE verified VIN1"}).encode())
    record = checker.check("vehicles/VIN1/events", f"{header}.AA.AA".encode())
    assert one_line(record["rejected"]), repr(record["rejected"])


def test_cloud_topic_vehicle_id_with_trailing_newline_is_rejected(cloud):
    pki, _ = cloud
    checker = MessageChecker(Verifier.from_jwks_file(pki / "jwks.json"))
    record = checker.check("vehicles/VIN1\n/status", b"online")
    assert "not a valid vehicle id" in record.get("rejected", ""), record
