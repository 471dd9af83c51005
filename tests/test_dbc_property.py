"""Every DBC that cantools reads is decoded exactly as cantools decodes it (issue 16).

For every DBC of the `opendbc` package (its 60-odd vehicle files under ``opendbc/dbc/``) and of
../shared/data: if cantools reads it (strict or not), ``load_dbcs`` loads it, else refuses it in
one line naming the file. Then, for every message and every page (multiplexed, and extended
multiplexed pages too), values drawn by Hypothesis are encoded with cantools, and what
``Decoder`` publishes is compared with what cantools decodes from the same frame, after the
mapping's rules: a value outside the DBC's [min|max] is ``invalid``, others are published as
cantools' physical value (within the rounding to the signal's resolution).
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
from pathlib import Path

import can
import cantools
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from agent.can.dbc import VehicleDatabase, load_dbcs
from agent.errors import ConfigError
from agent.signals.decoder import Decoder
from agent.signals.model import INVALID, VALID, Mapping, SignalSpec
from coredata import SHARED_DATA, one_line

_SPEC = importlib.util.find_spec("opendbc")   # located, not imported: only its files are used
OPENDBC = Path(_SPEC.submodule_search_locations[0]) / "dbc" if _SPEC else None
FILES = sorted(OPENDBC.glob("*.dbc")) if OPENDBC else []
FILES += sorted(SHARED_DATA.glob("*.dbc")) if SHARED_DATA.is_dir() else []
PAGES_PER_MUX = 3        # pages tried per multiplexer (first, middle, last): bounded run time
SELECTIONS = 6           # page selections per message


def test_the_real_dbc_files_are_there():
    """The property below must not pass by having no files (opendbc is in the test extra)."""
    assert OPENDBC is not None and len(list(OPENDBC.glob("*.dbc"))) >= 50, OPENDBC


def _cantools_reads(path: Path) -> bool:
    for strict in (True, False):
        try:
            cantools.database.load_file(path, strict=strict)
            return True
        except Exception:  # noqa: BLE001 - any refusal
            pass
    return False


def _selections(node: dict) -> list[tuple[dict[str, int], list]]:
    """Paths through cantools' codec tree: (multiplexer values, the signals they select)."""
    results: list[tuple[dict[str, int], list]] = [({}, list(node["signals"]))]
    for mux, pages in node["multiplexers"].items():
        ids = sorted(pages)
        picked = sorted({ids[0], ids[len(ids) // 2], ids[-1]})[:PAGES_PER_MUX]
        grown = []
        for chosen, signals in results:
            for page in picked:
                for sub_chosen, sub_signals in _selections(pages[page]):
                    grown.append(({**chosen, mux: page, **sub_chosen}, signals + sub_signals))
        results = grown[:SELECTIONS]
    return results


class _Message:
    """One message of a file: its page selections, a decoder mapping all its signals, and
    what each mapped VSS path stands for."""

    def __init__(self, vdb: VehicleDatabase, message, index: int) -> None:
        self.message = message
        self.selections = _selections(message._codecs)
        entries: dict[str, tuple[str, int | None]] = {}
        pages_seen: dict[str, set[int]] = {}
        for chosen, _ in self.selections:
            for signal in message.signals:
                if signal.multiplexer_signal in chosen:
                    pages_seen.setdefault(signal.name, set()).add(chosen[signal.multiplexer_signal])
        for n, signal in enumerate(message.signals):
            pages = signal.multiplexer_ids or []
            chosen_pages = sorted(pages_seen.get(signal.name, ())) if len(pages) > 1 else [None]
            for page in chosen_pages:
                entries[f"Vehicle.M{index}.S{n}P{page if page is not None else 'x'}"] = \
                    (signal.name, page)
        self.decoder, self.entries = self._decoder(vdb, entries)
        self.names = {name for name, _ in self.entries.values()}

    def _decoder(self, vdb, entries):
        """A decoder for every signal that can decode (a non-strict file's overlapping
        signals are refused at load, naming them: drop the one named and try again)."""
        while entries:
            specs = tuple(SignalSpec(path=path, message=self.message.name, signal=name, mux=page)
                          for path, (name, page) in entries.items())
            try:
                return Decoder(vdb, Mapping(file=Path("property.yaml"), signals=specs)), entries
            except ConfigError as exc:
                found = re.search(r"signals? (\w+)(?: \(| does)|and (\w+) overlap", str(exc))
                assert found, str(exc)
                drop = found.group(2) or found.group(1)
                entries = {p: e for p, e in entries.items() if e[0] != drop}
        return None, {}


def _raw(signal, rng: random.Random):
    if signal.is_float:
        return rng.uniform(-1e6, 1e6)
    if signal.is_signed:
        return rng.randint(-(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1)
    return rng.randint(0, (1 << signal.length) - 1)


def _expected(signal, physical) -> tuple[float | None, str]:
    lo, hi = signal.minimum, signal.maximum
    if lo == 0 and hi == 0:
        lo = hi = None
    slack = abs(signal.scale) * 1e-6
    if physical != physical or (lo is not None and physical < lo - slack) or (
            hi is not None and physical > hi + slack) or math.isinf(physical):
        return None, INVALID
    return physical, VALID


_CACHE: dict[Path, list[_Message]] = {}


def _messages(path: Path) -> list[_Message]:
    if path not in _CACHE:
        vdb = load_dbcs([path])
        _CACHE[path] = [m for m in (_Message(vdb, msg, i) for i, msg in
                                    enumerate(vdb.by_key.values())
                                    if msg.signals and not msg.is_container)
                        if m.decoder is not None]
    return _CACHE[path]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_loads_exactly_what_cantools_reads(path: Path):
    if _cantools_reads(path):
        assert load_dbcs([path]).by_key, path
    else:
        with pytest.raises(ConfigError) as info:
            load_dbcs([path])
        assert one_line(str(info.value)) and str(info.value).startswith(str(path))


@pytest.mark.parametrize("path", [p for p in FILES if _cantools_reads(p)], ids=lambda p: p.name)
# A seed cannot shrink usefully, and tracing a failure's explanation costs minutes: generate only.
@settings(max_examples=8, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
@given(seed=st.integers(0, 2**32 - 1))
def test_decode_publishes_what_cantools_decodes(path: Path, seed: int):
    _check(path, seed)


@settings(max_examples=30, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
@given(seed=st.integers(0, 2**32 - 1))
def test_extended_multiplexing_decodes_as_cantools(extended_dbc: Path, seed: int):
    _check(extended_dbc, seed)


@pytest.fixture(scope="module")
def extended_dbc(tmp_path_factory) -> Path:
    from coredata import EXT_DBC

    path = tmp_path_factory.mktemp("ext") / "extended.dbc"
    path.write_text(EXT_DBC)
    chosen = [c for e in _messages(path) for c, _ in e.selections]
    assert {"Page": 1, "SubPage": 2} in chosen and {"Page": 0} in chosen   # both levels
    return path


def _check(path: Path, seed: int) -> None:
    rng = random.Random(seed)      # one drawn seed: a small input for Hypothesis, many values
    for entry in _messages(path):
        message, decoder = entry.message, entry.decoder
        chosen, signals = rng.choice(entry.selections)
        # Signals dropped from the mapping (a non-strict file's overlapping signals, or ones
        # beyond the message) are 0: they cannot be encoded either.
        raw = {s.name: _raw(s, rng) if s.name in entry.names else 0 for s in signals}
        raw.update(chosen)
        try:
            data = message.encode(raw, scaling=False, padding=False, strict=False)
        except (OverflowError, cantools.database.EncodeError):
            # Overlapping signals (non-strict files): cantools encodes the mapped ones alone.
            mapped = cantools.database.can.Message(
                frame_id=message.frame_id, name=message.name, length=message.length,
                signals=[s for s in message.signals if s.name in entry.names],
                is_extended_frame=message.is_extended_frame, strict=False)
            data = mapped.encode({k: v for k, v in raw.items() if k in entry.names},
                                 scaling=False, padding=False, strict=False)
        try:
            theirs = message.decode_simple(data, decode_choices=False, scaling=True)
        except cantools.database.DecodeError:
            continue      # a non-strict file's message cantools cannot decode: nothing to match
        before = decoder.counters.unchanged
        ours = {decoder.paths[i]: (value, quality) for i, value, quality in
                decoder.decode(can.Message(arbitration_id=message.frame_id, data=data,
                                           is_extended_id=message.is_extended_frame,
                                           is_fd=len(data) > 8, timestamp=1.0))}
        if decoder.counters.unchanged > before:
            continue      # the same payload as last time: not decoded again, by design
        expected = {}
        for vss, (name, page) in entry.entries.items():
            signal = message.get_signal_by_name(name)
            if name in theirs and (page is None or chosen.get(signal.multiplexer_signal) == page):
                expected[vss] = _expected(signal, theirs[name])
        assert set(ours) == set(expected), (path.name, message.name, chosen)
        for vss, (value, quality) in expected.items():
            name = entry.entries[vss][0]
            got_value, got_quality = ours[vss]
            assert got_quality == quality, (path.name, message.name, name, theirs[name], ours[vss])
            if quality == VALID:
                signal = message.get_signal_by_name(name)
                tolerance = abs(signal.scale) / 2 + 1e-9 * max(1.0, abs(value))
                assert got_value == pytest.approx(value, abs=tolerance), (
                    path.name, message.name, name, theirs[name], got_value)
