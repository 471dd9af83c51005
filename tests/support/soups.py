"""Hypothesis strategies for capture files: mostly valid lines of each format, garbage lines
and line endings (used by the fuzz suite and by the fast-path agreement test)."""

from __future__ import annotations

from hypothesis import HealthCheck
from hypothesis import strategies as st

# Settings of every fuzz test: reproducible, no example database, no time limit.
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.filter_too_much])

_SAFE_CHARS = st.characters(blacklist_categories=("Cs",))

_HEX = "0123456789ABCDEF"
_TIMES = st.sampled_from(["1.0", "0", "", "-1", "nan", "inf", "1e400", "1700000000.123456",
                          "0x10", "1,5"]) | st.floats().map(repr) | st.integers().map(str)
_CHANNELS = st.sampled_from(["can0", "vcan0", "1", "2", "0", "x", "", "CANFD"]) | \
    st.text(alphabet=_SAFE_CHARS, max_size=4)
_IDS = st.sampled_from(["123", "7FF", "800", "FFF", "2B0", "3D0", "3C8", "18FF50E5",
                        "98FF50E5", "20000080", "1FFFFFFF", "FFFFFFFF", "12", "1234", "ZZZ",
                        "", "123x"]) | st.integers(0, 2**32 - 1).map(lambda i: f"{i:X}")
_DATA_HEX = st.binary(max_size=70).map(lambda b: b.hex().upper()) | st.sampled_from(
    ["R", "R8", "R9", "r", "R0", "#", "#1", "#F", "#G", "##", "A", "ABC", "XY"])
_TOKEN = st.text(alphabet=_SAFE_CHARS, max_size=8) | _TIMES | _IDS | _DATA_HEX | \
    st.sampled_from(["Rx", "Tx", "d", "r", "ErrorFrame", "CANFD", "DT", "RR", "FD", "FB",
                     "BRS", "ESI", "Length", "BitCount", "ID", "=", ";", "//", "$", "1)"])
_CANDUMP_LINE = st.builds(lambda t, c, i, sep, d: f"({t}) {c} {i}{sep}{d}",
                          _TIMES, _CHANNELS, _IDS, st.sampled_from(["#", "##", "#R", ""]),
                          _DATA_HEX)
_ASC_LINE = st.one_of(
    st.sampled_from(["date Mon Jan 1 00:00:00.000 am 2024", "date Tue Sep 30 15:06:13.191 2024",
                     "date garbage", "base hex  timestamps absolute",
                     "base dec timestamps relative", "base oct timestamps", "internal events logged",
                     "no internal events logged", "// version 9.0.0",
                     "Begin Triggerblock Mon Jan 1 00:00:00.000 am 2024", "Begin Triggerblock",
                     "End TriggerBlock", "   0.000000 Start of measurement"]),
    st.builds(lambda t, c, i, d, n, b: f"   {t} {c}  {i}x  {d}   d {n} {b}",
              _TIMES, _CHANNELS, _IDS, st.sampled_from(["Rx", "Tx", "Q"]),
              st.integers(-1, 20).map(str) | st.sampled_from(["F", "x"]),
              st.lists(st.integers(0, 255).map(lambda x: f"{x:02X}"), max_size=12).map(" ".join)),
    st.builds(lambda t, c, i, n, b: f"   {t} {c}  {i}  Rx   d {n} {b}  Length = 1 BitCount = 2 "
                                    f"ID = 3x", _TIMES, _CHANNELS, _IDS, st.integers(-1, 20)
              .map(str), st.lists(st.integers(0, 255).map(lambda x: f"{x:02X}"), max_size=9)
              .map(" ".join)),
    st.builds(lambda t, c, i, f, n, b: f"   {t} CANFD {c} Rx {i} {f} 1 0 {n} {n} {b}",
              _TIMES, _CHANNELS, _IDS, st.sampled_from(["", "Name"]), st.integers(-1, 70)
              .map(str), st.lists(st.integers(0, 255).map(lambda x: f"{x:02X}"), max_size=66)
              .map(" ".join)),
    st.builds(lambda t, c: f"   {t} {c}  ErrorFrame", _TIMES, _CHANNELS),
    st.builds(lambda t, c, i: f"   {t} {c}  {i}  Rx   r", _TIMES, _CHANNELS, _IDS),
)
_TRC_LINE = st.one_of(
    st.sampled_from([";$FILEVERSION=2.1", ";$FILEVERSION=1.1", ";$FILEVERSION=2.0",
                     ";$FILEVERSION=9", ";$STARTTIME=45000.1", ";$STARTTIME=x",
                     ";$COLUMNS=N,O,T,B,I,d,R,L,D", ";$COLUMNS=N,O,T,I,d,l,D", ";$COLUMNS=",
                     ";$COLUMNS=Q,Q", ";   Start time: 1/1/2024 00:00:00.000.0",
                     ";---+--", ";"]),
    st.builds(lambda n, t, k, c, i, d, b: f"{n}) {t} {k} {c} {i} {d} {b}",
              st.integers(-1, 99).map(str), _TIMES, st.sampled_from(["DT", "FD", "ER", "RR",
                                                                     "ST", "Rx", "X"]),
              _CHANNELS, _IDS, st.integers(-1, 70).map(str),
              st.lists(st.integers(0, 255).map(lambda x: f"{x:02X}"), max_size=10).map(" ".join)),
    st.builds(lambda n, t, i, d, b: f"{n}) {t} {i} {d} {b}", st.integers(0, 9).map(str), _TIMES,
              _IDS, st.integers(-1, 9).map(str),
              st.lists(st.integers(0, 255).map(lambda x: f"{x:02X}"), max_size=9).map(" ".join)),
)
_LINES = st.lists(st.one_of(_CANDUMP_LINE, _ASC_LINE, _TRC_LINE,
                            st.lists(_TOKEN, max_size=12).map(" ".join),
                            st.text(alphabet=_SAFE_CHARS, max_size=40),
                            st.just("x" * 2000)), max_size=40)


_T = st.floats(0, 2e9).map(lambda t: f"{t:.6f}")
_ID11 = st.sampled_from([0x2B0, 0x3C8, 0x3D0, 0x123]) | st.integers(0, 0x7FF)
_ID29 = st.sampled_from([0x18FF50E5]) | st.integers(0, 0x1FFFFFFF)
_B8 = st.binary(max_size=8)
_BFD = st.sampled_from([0, 8, 12, 16, 20, 24, 32, 48, 64, 13]).flatmap(
    lambda n: st.binary(min_size=n, max_size=n))
_GOOD_CANDUMP = st.one_of(
    st.builds(lambda t, i, d: f"({t}) can0 {i:03X}#{d.hex().upper()}", _T, _ID11, _B8),
    st.builds(lambda t, i, d: f"({t}) can1 {i:08X}#{d.hex()}", _T, _ID29, _B8),
    st.builds(lambda t, i, f, d: f"({t}) can0 {i:03X}##{f}{d.hex()}", _T, _ID11,
              st.sampled_from("0123"), _BFD),
    st.builds(lambda t, i, n: f"({t}) can0 {i:03X}#R{n}", _T, _ID11, st.sampled_from(["", "0", "8"])),
    st.builds(lambda t, e, d: f"({t}) can0 {0x20000000 | e:08X}#{d.hex()}", _T,
              st.integers(0, 0xFFFF), _B8),
)
_GOOD_ASC = st.one_of(
    st.builds(lambda t, c, i, ext, d: f"   {t} {c}  {i:X}{'x' if ext else ''}  Rx   d {len(d)} "
              + " ".join(f"{b:02X}" for b in d), _T, st.integers(1, 4), _ID11 | _ID29,
              st.booleans(), _B8),
    st.builds(lambda t, c, i, d: f"   {t} CANFD {c} Rx {i:X} 1 0 {len(d):x} {len(d)} "
              + " ".join(f"{b:02X}" for b in d), _T, st.integers(1, 4), _ID11, _BFD),
    st.builds(lambda t, c: f"   {t} {c}  ErrorFrame", _T, st.integers(1, 4)),
    st.builds(lambda t, c, i: f"   {t} {c}  {i:X}  Rx   r", _T, st.integers(1, 4), _ID11),
)
_GOOD_TRC = st.one_of(
    st.builds(lambda n, ms, c, i, d: f"{n:7d} {ms:13.3f} DT {c:2d} {i:8X} Rx -  {len(d)}    "
              + " ".join(f"{b:02X}" for b in d), st.integers(1, 10**6), st.floats(0, 1e7),
              st.integers(1, 4), _ID11 | _ID29, _B8),
    st.builds(lambda n, ms, c, i, d: f"{n:7d} {ms:13.3f} FB {c:2d} {i:8X} Rx -  {len(d)}    "
              + " ".join(f"{b:02X}" for b in d), st.integers(1, 10**6), st.floats(0, 1e7),
              st.integers(1, 4), _ID11, _BFD),
)
_HEADERS = {
    "candump": [""],
    "asc": ["date Mon Jan 5 10:00:00.000 am 2026\nbase hex  timestamps absolute\n"
            "internal events logged\nBegin Triggerblock Mon Jan 5 10:00:00.000 am 2026",
            "date Mon Jan 5 10:00:00.000 am 2026\nbase dec  timestamps relative", ""],
    "trc": [";$FILEVERSION=2.1\n;$STARTTIME=46027.4166666667\n;$COLUMNS=N,O,T,B,I,d,R,L,D",
            ";$FILEVERSION=2.1\n;$STARTTIME=46027.4", ""],
}
_GOOD_LINES = {"candump": _GOOD_CANDUMP, "asc": _GOOD_ASC, "trc": _GOOD_TRC}
_GARBAGE_LINE = st.one_of(_CANDUMP_LINE, _ASC_LINE, _TRC_LINE,
                          st.lists(_TOKEN, max_size=12).map(" ".join),
                          st.text(alphabet=_SAFE_CHARS, max_size=40))


def _format_soup(fmt: str) -> st.SearchStrategy:
    """Mostly valid lines of one format, a header (or not), and some garbage in between."""
    headers = _HEADERS[fmt]
    return st.tuples(st.sampled_from([headers[0]] * 4 + headers), st.lists(
        st.one_of(*[_GOOD_LINES[fmt]] * 6, _GARBAGE_LINE), min_size=1, max_size=40)
    ).map(lambda hl: ([hl[0]] if hl[0] else []) + hl[1])


def _soup(lines: list[str], ending: str) -> bytes:
    return ending.join(lines).encode("utf-8", errors="surrogatepass") + ending.encode()
