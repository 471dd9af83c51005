"""The decode fast path (CaptureReader.filtered + SignalPipeline.run_capture) against the plain
path (every frame a can.Message through SignalPipeline.run): the same changes, in the same
order with the same times, and the same counts, malformed-line reports and channel counts, on
the same captures: a simulated drive (multiplexed WindowStatus, a 29-bit id, stale signals)
and hand-written lines of every kind the reader knows or refuses."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from agent.can.capture import open_capture
from agent.can.capture.base import EXTENDED_KEY as CAPTURE_EXTENDED_KEY
from agent.can.dbc import EXTENDED_KEY
from agent.dev.simulate import write_capture
from agent.signals.model import STALE
from agent.signals.state import STALE_CHECK_INTERVAL, SignalPipeline
from coredata import ASC
from coredata import (BODY_ID, BODY_PATHS, CLUSTER_ID, DEMO_CONFIG, WINDOW_ID, body_payload,
                      demo_decoder, demo_vehicle)


def both_paths(path: Path, fmt: str | None = None, channel: str | None = None):
    """(changes, counters, reader facts) by the plain path and by the fast path."""
    results = []
    for fast in (False, True):
        pipeline = SignalPipeline(demo_decoder())
        with open_capture(path, fmt, channel) as reader:
            run = pipeline.run_capture(reader) if fast else pipeline.run(reader)
            changes = [(c.t, c.path, c.value, c.quality) for c in run]
            facts = (reader.malformed, reader.first_malformed, reader.other_channel,
                     reader.frames, reader.error)
        results.append((changes, pipeline.decoder.counters.as_dict(), facts))
    return results


def test_frame_keys_agree_with_the_dbc_layer():
    assert CAPTURE_EXTENDED_KEY == EXTENDED_KEY


def test_simulated_drive_decodes_identically(tmp_path):
    capture = tmp_path / "drive.log"
    write_capture(demo_vehicle(), capture, 30.0, 7, 3000.0, None)
    plain, fast = both_paths(capture)
    assert fast == plain
    changes, counters, _ = fast
    assert counters["frames"] > 80_000 and counters["unmapped"] > 0 and counters["decoded"] > 0
    assert counters["frames"] == sum(v for k, v in counters.items() if k != "frames")
    assert any(path.endswith("Window.Position") for _, path, _, _ in changes)   # mux pages


def agreed(capture: Path, lines: list[str]):
    """Writes ``lines`` to ``capture``; the fast path's results, checked equal to the plain's."""
    capture.write_text("\n".join(lines) + "\n")
    plain, fast = both_paths(capture)
    assert fast == plain
    return fast


def body_stale(result) -> list:
    """The stale changes of the body signals in a result of both_paths; all of them went."""
    stale = [c for c in result[0] if c[3] == STALE and c[1] in BODY_PATHS]
    assert sorted(path for _, path, _, _ in stale) == sorted(BODY_PATHS)
    return stale


def line(t: float, ident: str, data: str, chan: str = "can0") -> str:
    return f"({t:.6f}) {chan} {ident}#{data}"


def test_stale_changes_come_at_the_unmapped_frame_that_notices_them(tmp_path):
    """Body frames (one payload, repeated) stop while unrelated traffic goes on: the stale
    changes carry the time of the unrelated frame at which the check ran, and the payload
    coming back is decoded again, by both paths."""
    body = body_payload().hex().upper()
    lines = []
    t = 1700000000.0
    for n in range(400):                 # 2 s: body every 50 ms for 0.5 s, then nothing
        t = 1700000000.0 + n * 0.005
        if n % 10 == 0 and (n < 100 or n >= 300):       # the same payload each time
            lines.append(line(t, f"{BODY_ID:03X}", body))
        lines.append(line(t + 0.0001, "123", "0011223344556677"))
    fast = agreed(tmp_path / "gap.log", lines)
    stale = body_stale(fast)
    unrelated = {round(1700000000.0 + n * 0.005 + 0.0001, 6) for n in range(400)}
    assert {round(t, 6) for t, *_ in stale} <= unrelated
    last_body = 1700000000.0 + 90 * 0.005
    assert all(t > last_body + 0.3 and t < last_body + 0.3 + 2 * STALE_CHECK_INTERVAL
               for t, *_ in stale)
    # Repeats are unchanged; the same payload after the silence is decoded again.
    assert fast[1]["unchanged"] == 9 + 9 and fast[1]["decoded"] == 2
    back = [c for c in fast[0] if c[1] in BODY_PATHS and c[0] == 1700000000.0 + 300 * 0.005]
    assert sorted(path for _, path, _, _ in back) == sorted(BODY_PATHS)


ODD_LINES = [
    line(1.0, "123", "0011"),
    "",
    "   ",
    "# a comment",
    line(1.01, "2b0", body_payload().hex()),            # a mapped id in lower case
    line(1.02, "7FF", "00"),
    line(1.03, "800", "00"),                            # 11-bit id out of range
    line(1.04, "123", "001"),                           # odd number of digits
    line(1.05, "123", "00112233445566778899"),          # 10 bytes on classic CAN
    line(1.06, "123", "00GG"),                          # not hex
    line(1.07, "123", ""),                              # no data
    line(1.08, "123", "R"),                             # remote, unmapped
    line(1.09, f"{BODY_ID:03X}", "R8"),                 # remote, mapped
    line(1.10, "123", "#1" + "00" * 12),                # CAN FD, unmapped
    line(1.11, "20000004", "0000000000000000"),         # error frame
    line(1.12, "1FFFFFFF", "00"),                       # 29-bit id, unmapped
    line(1.13, "3FFFFFFF", "00"),                       # error flag plus bits: error frame
    line(1.14, "40000000", "00"),                       # beyond 29 bits
    line(1.15, "1234", "00"),                           # 4 digits
    "(1.16) can0 123",                                  # no '#'
    "(1.17) can0 123#00 extra",                         # four fields
    "(1e1) can0 123#00",                                # a timestamp float() takes
    "(nan) can0 123#00",
    "(inf) can0 123#00",
    "(-1.5) can0 123#00",
    "(1_0.5) can0 123#00",
    "(1.5_) can0 123#00",
    "(.5) can0 123#00",
    "(5.) can0 123#00",
    "(.) can0 123#00",
    "() can0 123#00",
    "(" + "9" * 400 + ".0) can0 123#00",               # overflows to inf
    "(1.18 can0 123#00",
    "(\u0661.5) can0 123#00",                           # Arabic-Indic digit: float() takes it
    line(1.19, "123", "00", chan="can1"),               # another channel
    line(1.20, f"{WINDOW_ID:03X}", "01320000"),         # multiplexed, page 1
    line(1.21, f"{WINDOW_ID:03X}", "01320000"),         # same payload again
    line(1.22, f"{WINDOW_ID:03X}", "00330000"),         # page 0
    line(1.23, f"{CLUSTER_ID:03X}", "00"),              # mapped, wrong length
    line(1.24, "18FF50E5", "0000000000000000"),         # the mapped 29-bit id
    line(1.25, "18ff50e5", "0000000000000000"),         # same, unchanged
    "x" * 3000,                                         # overlong
    line(1.30, "123", "00"),
]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("channel", [None, "can0"])
def test_every_kind_of_line_is_handled_identically(tmp_path, ending, channel):
    capture = tmp_path / "odd.log"
    capture.write_text(ending.join(ODD_LINES) + ending, newline="")
    plain, fast = both_paths(capture, "candump", channel)
    assert fast == plain
    changes, counters, (malformed, first, other, _frames, _error) = fast
    assert counters["frames"] == sum(v for k, v in counters.items() if k != "frames")
    assert counters["error_frames"] == 2 and counters["remote_frames"] == 1
    assert counters["wrong_length"] == 1 and counters["decoded"] >= 4
    assert malformed > 10 and other == (1 if channel else 0)


def test_carriage_returns_after_many_plain_lines(tmp_path):
    """A file that turns to \\r\\n past the first blocks: line numbers still count right."""
    plain_part = "\n".join(line(1.0 + n * 0.001, "123", "00") for n in range(20_000))
    capture = tmp_path / "late-cr.log.gz"
    with gzip.open(capture, "wt", newline="") as f:
        f.write(plain_part + "\r\n" + "\r\n".join(ODD_LINES) + "\r\n")
    plain, fast = both_paths(capture)
    assert fast == plain
    assert fast[2][1][0][0] == 20_001 + ODD_LINES.index(line(1.03, "800", "00"))


@pytest.mark.parametrize("suffix, writer", [(".asc", "ASCWriter"), (".blf", "BLFWriter")])
def test_other_formats_filter_identically(tmp_path, suffix, writer):
    """ASC and BLF through python-can's readers and the generic filter: same as decoding all."""
    import can

    source = tmp_path / "drive.log"
    write_capture(demo_vehicle(), source, 5.0, 3, 2000.0, None)
    capture = tmp_path / f"drive{suffix}"
    out = getattr(can, writer)(str(capture))
    with open_capture(source) as reader:
        for msg in reader:
            msg.channel = 0
            out.on_message_received(msg)
    out.stop()
    plain, fast = both_paths(capture)
    assert fast == plain
    assert fast[1]["unmapped"] > 0 and fast[1]["decoded"] > 0 and fast[0]


ASC_HEAD = ASC.split("   0.010000")[0]      # header, trigger block, start of measurement
ASC_ODD = [
    "   0.010000 1  3D0             Rx   d 8 9C 80 15 70 00 00 00 71",
    "   0.011000 1  123             Rx   d 8 00 11 22 33 44 55 66 77",
    "   0.012000 2  123             Tx   d 2 00 11",
    "   0.013000 1  123             Rx   d 8 00 11",                     # fewer bytes than DLC
    "   0.014000 1  123             Rx   d 8 00 11 22 33 44 55 66 77 88 99",
    "   0.015000 1  123             Rx   d 8 0 11 22 33 44 55 66 77",    # one-digit byte
    "   0.016000 1  123             Rx   d 8 00 ZZ 22 33 44 55 66 77",   # not hex
    "   0.017000 1  123             Rx   d 8 100 11 22 33 44 55 66 77",  # > 255
    "   0.018000 1  123             Rx   d F 00 11 22 33 44 55 66 77",   # DLC 15
    "   0.019000 1  123             Rx   d G 00",                       # bad DLC
    "   0.020000 1  123             Rx   r",                            # remote
    "   0.021000 1  123             Rx   r 8",
    "   0.022000 1  ErrorFrame",
    "   0.023000 1  1FFFFFFFx       Rx   d 1 00",
    "   0.024000 1  18FF50E5x       Rx   d 8 00 00 AC 41 64 00 00 00",
    "   0.025000 1  x               Rx   d 1 00",
    "   0.026000 1  12G             Rx   d 1 00",
    "   0.027000 1  123             Xx   d 1 00",
    "   0.028000 1\u00a0 123             Rx   d 1 00",                     # no-break space
    "   0.029000 01 123             Rx   d 1 00",
    "   .030000 1  123             Rx   d 1 00",
    "   0.031000 CANFD 1 Rx 123 1 0 d 8 8 00 11 22 33 44 55 66 77 0 0 0 0 0 0 0",
    "   0.032000 1  2B0             Rx   d 8 00 0F 00 00 00 00 00 BF",
    "   0.5 1  123             Rx   d 1 00",
    "   9.000000 1  123             Rx   d 1 00",                       # stale checks due
    "   9.500000 1  3D0             Rx   d 8 9C 80 15 70 00 00 00 71",
    "   9.600000 1  123             Rx   d 1 00 Length = 1 BitCount = 44 ID = 291",
    "End TriggerBlock",
]


@pytest.mark.parametrize("channel", [None, "1"])
def test_every_kind_of_asc_line_is_handled_identically(tmp_path, channel):
    capture = tmp_path / "odd.asc"
    capture.write_text(ASC_HEAD + "\n".join(ASC_ODD) + "\n")
    plain, fast = both_paths(capture, "asc", channel)
    assert fast == plain
    changes, counters, (malformed, _first, other, _frames, _error) = fast
    assert counters["frames"] == sum(v for k, v in counters.items() if k != "frames")
    assert counters["unmapped"] > 5 and counters["decoded"] >= 3 and malformed >= 3
    assert any(quality == STALE for *_, quality in changes)
    assert other == (1 if channel else 0)


def test_decode_loads_neither_mqtt_nor_signing(tmp_path):
    """`decode` is offline: paho-mqtt and cryptography stay unimported (memory, start-up)."""
    import subprocess
    import sys

    capture = tmp_path / "one.log"
    capture.write_text(line(1.0, f"{BODY_ID:03X}", body_payload().hex()) + "\n")
    probe = ("import sys; from agent.cli import main; code = main(['decode', '--config', "
             f"{str(DEMO_CONFIG)!r}, {str(capture)!r}]); "
             "print(code, sorted({m.split('.')[0] for m in sys.modules} & "
             "{'paho', 'cryptography', 'agent'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.splitlines()[-1] == "0 ['agent']"


# Property: on any soup of mostly-valid lines, garbage and line endings (the fuzz suite's own
# strategies), in candump and ASC, the fast path agrees with the plain one.
from hypothesis import given, settings, strategies as st          # noqa: E402
from support.soups import FUZZ, _format_soup, _soup               # noqa: E402

_SOUP_DIR: list[Path] = []


@settings(max_examples=150, **FUZZ)
@given(data=st.data(), kind=st.sampled_from(["candump", "asc"]),
       ending=st.sampled_from(["\n", "\n", "\r\n", "\r"]),
       channel=st.none() | st.sampled_from(["can0", "vcan0", "1"]))
def test_fast_path_agrees_on_line_soups(tmp_path_factory, data, kind, ending, channel):
    if not _SOUP_DIR:
        _SOUP_DIR.append(tmp_path_factory.mktemp("soups"))
    lines = data.draw(_format_soup(kind), label="lines")
    path = _SOUP_DIR[0] / f"soup.{'log' if kind == 'candump' else 'asc'}"
    path.write_bytes(_soup(lines, ending))
    plain, fast = both_paths(path, kind, channel)
    assert fast == plain


# --- the block scan of candump files (runs of plain unwanted lines found by one regex) -------

def busy_lines(start: float, count: int, step: float = 0.000111, seed: int = 5,
               shuffle: bool = False) -> list[str]:
    """Unrelated traffic (the ids of a busy bus, none mapped), with the body frame (one
    payload, repeated) every 100th line; timestamps shuffled within each 10 ms if asked."""
    import random
    rnd = random.Random(seed)
    times = [start + n * step for n in range(count)]
    if shuffle:
        window = int(0.01 / step)
        for at in range(0, count, window):
            part = times[at:at + window]
            rnd.shuffle(part)
            times[at:at + window] = part
    body = body_payload().hex().upper()
    out = []
    for n, t in enumerate(times):
        if n % 100 == 50:
            out.append(line(t, f"{BODY_ID:03X}", body))
        else:
            ident = rnd.choice(("123", "7FF", "000", "1FFFFFFF", "00000123", "5A1", "2B1"))
            out.append(line(t, ident, bytes(rnd.randrange(256) for _ in
                                            range(rnd.randrange(9))).hex().upper()))
    return out


# Lines that end a run of plain unwanted lines; each is read by the full parser.
RUN_BREAKERS = [
    line(0, "2b0", body_payload().hex()),               # a mapped id in lower case
    line(0, "2B0", body_payload().hex().lower()),       # ... with lower-case data
    line(0, "18ff50E5", "0000AC4164000000"),           # the mapped 29-bit id, mixed case
    line(0, "20000004", "0000000000000000"),           # error frame
    line(0, "123", "R"),                                # remote, unmapped
    line(0, f"{BODY_ID:03X}", "R8"),                    # remote, mapped
    line(0, "123", "#1" + "00" * 12),                   # CAN FD
    line(0, "800", "00"),                               # 11-bit id out of range
    line(0, "40000000", "00"),                          # beyond 29 bits
    line(0, "123", "001"),                              # odd number of digits
    line(0, "123", "00" * 9),                           # 9 bytes on classic CAN
    line(0, "123", "00GG"),
    line(0, "12", "00"),
    line(0, "123", "00", chan="can1"),                  # another channel
    line(0, "123", "00", chan="c(a)n0"),                # parentheses in the channel
    line(0, "123", "00") + " T",                        # four fields
    line(0, "123", "00").replace(" ", "  ", 1),         # two spaces
    line(0, "123", "00").replace(" ", "\t", 1),         # a tab
    "\t" + line(0, "123", "00") + " ",                  # surrounding blanks
    "(0) can0 123#00",                                  # no decimals
    "(" + "9" * 400 + ".0) can0 123#00",               # overflows to inf
    "(" + "0" * 30 + "0.000000) can0 123#00",          # more digits than a run reads
    "(0.000000" + "0" * 30 + ") can0 123#00",
    "(1.5) can0 123#00#",
    "",
    "# a comment",
    "x" * 1024,                                         # the longest line read
    "x" * 1025,                                         # too long
    "(1.5) can0 123#00\x0b",                           # vertical tab: a blank to split()
    "(1.5) can0 123#00\x1c",                           # file separator: a blank as well
]


def write_lines(capture: Path, lines: list[str], ending: str) -> None:
    """``lines`` each with ``ending``; "\\n and a few \\r": "\\n", a lone "\\r" now and then."""
    if len(ending) > 2:
        capture.write_text("".join(text + ("\r" if n % 9001 == 5000 else "\n")
                                   for n, text in enumerate(lines)), newline="")
    else:
        capture.write_text(ending.join(lines) + ending, newline="")


def stamped(text: str, t: float) -> str:
    """A RUN_BREAKERS line with timestamp t (written as it was: "(0)" -> "(1700000000)")."""
    if text.startswith("(0)"):
        return f"({t:.0f}){text[3:]}"
    return text.replace("0.000000", f"{t:.6f}", 1)


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r", "\n and a few \r"])
@pytest.mark.parametrize("channel", [None, "can0"])
def test_lines_that_break_runs_amid_blocks_are_read_as_by_the_plain_path(tmp_path, ending,
                                                                          channel):
    """Every kind of odd line in the middle of long runs of plain ones, over many blocks (lines
    split across blocks): same changes, counts and malformed-line reports, at the right line
    numbers. Line ends: any of Python's, or "\\n" with a lone "\\r" now and then."""
    lines = busy_lines(1700000000.0, 40_000)
    at = {}
    for k, odd in enumerate(RUN_BREAKERS):
        where = 700 + k * 1301              # in the middle of runs, across many blocks
        at[where] = odd
        lines.insert(where, stamped(odd, 1700000000.0 + where * 0.000111))
    capture = tmp_path / "breakers.log"
    write_lines(capture, lines, ending)
    plain, fast = both_paths(capture, "candump", channel)
    assert fast == plain
    changes, counters, (malformed, first, other, frames, error) = fast
    assert error is None and frames == counters["frames"]
    assert counters["frames"] == sum(v for k, v in counters.items() if k != "frames")
    assert counters["error_frames"] == 1 and counters["remote_frames"] == 1
    assert counters["unchanged"] > 390 and counters["decoded"] == 2    # lower-case data: same
    assert other == (2 if channel else 0)
    # 800, 40000000, 001, 9 bytes, 00GG, 12, inf, 00#, x * 1024, too long
    assert malformed == 10
    numbers = sorted(at)
    assert [n for n, _ in first] == [numbers[k] + 1 for k in (7, 8, 9, 10, 11)]
    assert [why for _, why in first] == ["bad frame id", "bad frame id", "bad data bytes",
                                         "9 data bytes is not a valid CAN length",
                                         "bad data bytes"]


@pytest.mark.parametrize("shuffle", [False, True])
def test_stale_checks_fall_on_the_same_frames_with_timestamps_out_of_order(tmp_path, shuffle):
    """Body frames stop and come back amid traffic whose timestamps go back and forth within
    10 ms: the checks (stale changes) are made at the same unmapped frames by both paths."""
    lines = busy_lines(1700000000.0, 30_000, shuffle=shuffle)
    # Body frames stop from 1 s to 2.5 s: their signals go stale in the gap.
    lines = [text for n, text in enumerate(lines)
             if not (9000 < n < 22500 and f" {BODY_ID:03X}#" in text)]
    stale = body_stale(agreed(tmp_path / "shuffled.log", lines))
    assert all(1700000001.0 < t < 1700000002.5 for t, *_ in stale)


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 6, 9])
def test_timestamps_of_any_precision_and_width(tmp_path, decimals):
    """Timestamps with 0 to 9 decimals, their integer part growing a digit (9.99 -> 10.0 ->
    ... 100.0): the same checks and changes as the plain path."""
    body = body_payload().hex().upper()
    lines = []
    for n in range(60_000):
        t = 9.5 + n * 0.0017
        if n % 400 == 0 and not 2000 < n < 5000:
            lines.append(f"({t:.{decimals}f}) can0 {BODY_ID:03X}#{body}")
        lines.append(f"({t:.{decimals}f}) can0 123#0011")
    fast = agreed(tmp_path / "precision.log", lines)
    assert any(c[3] == STALE for c in fast[0]) and fast[1]["unmapped"] == 60_000


def test_carriage_return_and_newline_split_across_blocks(tmp_path):
    """"\\r\\n" whose "\\r" ends one block and "\\n" starts the next is one line end."""
    from agent.can.capture.base import _BLOCK

    head = "#\r\n" * ((_BLOCK - 4) // 3) + "###\r\n"
    assert head.index("\r", _BLOCK - 4) == _BLOCK - 1   # a block's last char
    lines = [line(1.0 + n * 0.001, "123", "00") for n in range(3000)]
    lines[1000] = line(2.0, "800", "00")
    capture = tmp_path / "split-crlf.log"
    capture.write_text(head + "\r\n".join(lines) + "\r\n", newline="")
    plain, fast = both_paths(capture)
    assert fast == plain
    assert fast[2][1] == [(head.count("\n") + 1000 + 1, "bad frame id")]
    assert fast[1]["unmapped"] == 2999


def test_only_the_lines_that_break_runs_are_parsed(tmp_path, monkeypatch):
    """The point of the block scan: a line of an unwanted id, written as candump writes it,
    is never parsed on its own; wanted ids and odd lines are (each once)."""
    from agent.can.capture import candump

    parsed = []
    real = candump.parse_fields
    monkeypatch.setattr(candump, "parse_fields", lambda parts: parsed.append(parts) or
                        real(parts))
    lines = busy_lines(1700000000.0, 20_000)
    lines.insert(10_001, "(1700000001.1) can0 7FF#")        # no data: plain too
    lines.insert(10_002, "(1700000001.1) can0 7FF#R")       # remote: parsed
    capture = tmp_path / "plain.log"
    capture.write_text("\n".join(lines) + "\n")
    pipeline = SignalPipeline(demo_decoder())
    with open_capture(capture) as reader:
        changes = list(pipeline.run_capture(reader))
    counters = pipeline.decoder.counters
    assert changes and counters.frames == 20_002 and counters.unmapped == 19_800 + 2
    assert counters.decoded == 1 and counters.unchanged == 199 and counters.remote_frames == 0
    # The body frames that are not repeats (the first; none other here), and the odd line.
    assert [p[2] for p in parsed] == [f"{BODY_ID:03X}#{body_payload().hex().upper()}",
                                      "7FF#R"]


# --- the block scan of ASC files ----------------------------------------------------------

def asc_line(t: float, ident: str, data: bytes, chan: str = "1", tail: str = "") -> str:
    hexes = " ".join(f"{b:02X}" for b in data)
    return f"   {t:.6f} {chan}  {ident:<15} Rx   d {len(data)} {hexes}{tail}".rstrip(" ")


def busy_asc(count: int, step: float = 0.000111, seed: int = 5, shuffle: bool = False,
             gap: tuple[int, int] = (0, 0)) -> list[str]:
    """busy_lines' traffic as ASC lines (relative times), the body frame every 100th line
    (none in ``gap``); a few lines in Vector's long form (Length, BitCount, ID)."""
    out = []
    for n, text in enumerate(busy_lines(0.0, count, step, seed, shuffle)):
        stamp, _chan, frame = text.split()
        ident, _, data = frame.partition("#")
        if ident == f"{BODY_ID:03X}" and gap[0] < n < gap[1]:
            continue
        ident = f"{int(ident, 16):X}x" if len(ident) == 8 else ident
        tail = f"  Length = 240000 BitCount = 124 ID = {int(ident.rstrip('x'), 16)}" \
            if n % 7 == 0 else ""
        out.append(asc_line(float(stamp[1:-1]), ident, bytes.fromhex(data), tail=tail))
    return out


ASC_BREAKERS = [
    asc_line(0, "2b0", body_payload()),                  # mapped id, lower case
    asc_line(0, "02B0", body_payload()),                 # ... with a leading zero
    asc_line(0, "018ff50e5x", bytes(8)),                 # the mapped 29-bit id
    asc_line(0, "18FF50E5", bytes(8)),                   # the same digits, 11-bit: unmapped
    "   0.000000 1  ErrorFrame",
    "   0.000000 1  123             Rx   r",
    "   0.000000 1  123             Rx   d 8 00 11",     # fewer bytes than the DLC
    "   0.000000 1  123             Rx   d 2 00 11 22",  # more
    "   0.000000 1  123             Rx   d 2 00 1",      # a one-digit byte
    "   0.000000 1  123             Rx   d 2 00 ZZ",
    "   0.000000 1  123             Rx   d G 00",
    "   0.000000 1  123             Xx   d 1 00",
    "   0.000000 2  123             Rx   d 1 00",        # another channel
    "   0.000000 01  123            Rx   d 1 00",        # channel 1, spelled 01
    "   0.000000 1  123             Tx   D 1 00",
    "   0.000000 1\t123\tRx\td 1 00",
    "   0.000000 1  123             Rx   d 1 00\x0b",
    "   0.000000 1  1_23            Rx   d 1 00",
    "   0.000000 CANFD 1 Rx 123 1 0 d 8 8 00 11 22 33 44 55 66 77 0 0 0 0 0 0 0",
    "   0.000000 1  123             Rx   d 1 00  caf\u00e9",   # not ASCII
    "   0.000000 Start of measurement",
    "// a comment",
    "",
    "   " + "x" * 5000,                                 # too long
    "Begin Triggerblock Mon Jan 5 11:00:00.000 am 2026",    # a new start time
    "   0.000000 1  123             Rx   d 1 00",
]


def stamped_asc(text: str, t: float) -> str:
    return text.replace("0.000000", f"{t:.6f}", 1)


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\n and a few \r"])
@pytest.mark.parametrize("channel", [None, "1"])
def test_asc_lines_that_break_runs_amid_blocks_are_read_as_by_the_plain_path(
        tmp_path, ending, channel):
    lines = busy_asc(40_000, gap=(33_000, 37_000))     # body frames stop for a while
    for k, odd in enumerate(ASC_BREAKERS):
        where = 700 + k * 1301
        lines.insert(where, stamped_asc(odd, where * 0.000111))
    lines = ASC_HEAD.splitlines() + lines + ["End TriggerBlock"]
    capture = tmp_path / "breakers.asc"
    write_lines(capture, lines, ending)
    plain, fast = both_paths(capture, "asc", channel)
    assert fast == plain
    changes, counters, (malformed, first, other, frames, error) = fast
    assert error is None and counters["frames"] == frames
    assert counters["frames"] == sum(v for k, v in counters.items() if k != "frames")
    assert counters["error_frames"] == 1 and counters["decoded"] >= 2
    assert counters["unmapped"] > 39_000 and counters["unchanged"] > 350
    assert other == (1 if channel else 0) and malformed >= 3
    # The body signals go stale after the second trigger block (its start time an hour on).
    assert ASC_BREAKERS.index("Begin Triggerblock Mon Jan 5 11:00:00.000 am 2026") * 1301 \
        + 700 < 33_000
    body_stale(fast)


@pytest.mark.parametrize("shuffle", [False, True])
def test_asc_stale_checks_fall_on_the_same_frames(tmp_path, shuffle):
    lines = busy_asc(30_000, shuffle=shuffle, gap=(9000, 22500))
    capture = tmp_path / "gap.asc"
    capture.write_text(ASC_HEAD + "\n".join(lines) + "\nEnd TriggerBlock\n")
    plain, fast = both_paths(capture)
    assert fast == plain
    start = fast[0][0][0] - 0.00555          # the first body frame, 50 lines in
    stale = body_stale(fast)
    assert all(start + 1.0 < t < start + 2.5 for t, *_ in stale)


def test_asc_only_the_lines_that_break_runs_are_looked_at_one_by_one(tmp_path, monkeypatch):
    from agent.can.capture import pythoncan

    looked_at = []
    real = pythoncan._AscFilter.skips
    monkeypatch.setattr(pythoncan._AscFilter, "skips",
                        lambda self, line, reader: looked_at.append(line) or
                        real(self, line, reader))
    lines = busy_asc(20_000)
    capture = tmp_path / "plain.asc"
    capture.write_text(ASC_HEAD + "\n".join(lines) + "\nEnd TriggerBlock\n")
    pipeline = SignalPipeline(demo_decoder())
    with open_capture(capture) as reader:
        list(pipeline.run_capture(reader))
    counters = pipeline.decoder.counters
    assert counters.frames == 20_000 and counters.unmapped == 19_800
    assert counters.unchanged + counters.decoded == 200
    # The body frames, the line after each trigger of a stale check, the first line of a
    # block, the end: never the unmapped lines of a run.
    body = [text for text in looked_at if f" {BODY_ID:03X} " in text]
    assert len(body) == 200 and len(looked_at) - len(body) < 20_000 // 50


def test_a_check_due_by_a_jump_ahead_is_judged_after_re_basing(tmp_path):
    """A capture whose clock jumps an hour ahead (a new recording appended): the unmapped
    frame after the jump reaches the check by its own timestamp but, re-based to follow the
    frame before it, not by the pipeline's clock; both paths check (and go stale) alike."""
    lines = busy_lines(1700000000.0, 30_000)
    lines = lines[:12_000] + busy_lines(1700003600.0 + 12_000 * 0.000111, 18_000, seed=6)
    lines = [text for n, text in enumerate(lines)
             if not (14_000 < n < 20_000 and f" {BODY_ID:03X}#" in text)]
    body_stale(agreed(tmp_path / "jump.log", lines))
