"""agent.can.capture: candump -L, Vector ASC, PEAK TRC and BLF readers (streaming, line-aware)."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import can
import pytest

from agent.can.capture import detect_format, format_candump, open_capture
from agent.can.capture.base import FIRST_MALFORMED
from agent.can.capture.candump import CandumpReader
from agent.can.capture.pythoncan import PythonCanReader
from agent.errors import UserError
from agent.signals.model import VALID
from agent.signals.state import SignalPipeline
from coredata import ASC, REL, cluster_payload, demo_decoder, write


def read_all(path, fmt=None, channel=None):
    with open_capture(path, fmt, channel) as reader:
        frames = list(reader)
    return reader, frames


def summary(msg: can.Message) -> tuple:
    return (msg.timestamp, msg.channel, msg.arbitration_id, msg.is_extended_id, bytes(msg.data),
            msg.is_fd, msg.bitrate_switch, msg.error_state_indicator, msg.is_remote_frame,
            msg.is_error_frame)


# -- candump -L --------------------------------------------------------------------------------

CANDUMP = """\
(1700000000.000000) can0 3D0#9C80157000000071
(1700000000.010000) can0 18FF50E5#0000AC4164000000
(1700000000.020000) can1 123##1DEADBEEF
(1700000000.030000) can0 456##3
(1700000000.040000) can0 7FF#R
(1700000000.050000) can0 1ABCDEF0#R5
(1700000000.060000) can0 20000004#0004000000000000
(1700000000.070000) can0 2B0#0102 R
(1700000000.080000) can1 001# T
"""


def test_candump_kinds_of_frames(tmp_path):
    reader, frames = read_all(write(tmp_path / "a.log", CANDUMP))
    assert reader.format == "candump" and reader.malformed == 0
    error = frames.pop(6)
    assert (error.timestamp, error.channel, error.arbitration_id, error.is_error_frame) == (
        1700000000.06, "can0", 0x4, True)           # CAN_ERR_FLAG stripped, class bits kept
    assert [summary(m) for m in frames] == [
        (1700000000.0, "can0", 0x3D0, False, bytes.fromhex("9C80157000000071"),
         False, False, False, False, False),
        (1700000000.01, "can0", 0x18FF50E5, True, bytes.fromhex("0000AC4164000000"),
         False, False, False, False, False),
        (1700000000.02, "can1", 0x123, False, bytes.fromhex("DEADBEEF"),
         True, True, False, False, False),                            # FD, bit rate switch
        (1700000000.03, "can0", 0x456, False, b"", True, True, True, False, False),  # BRS+ESI
        (1700000000.04, "can0", 0x7FF, False, b"", False, False, False, True, False),
        (1700000000.05, "can0", 0x1ABCDEF0, True, b"", False, False, False, True, False),
        (1700000000.07, "can0", 0x2B0, False, b"\x01\x02", False, False, False, False, False),
        (1700000000.08, "can1", 0x001, False, b"", False, False, False, False, False),
    ]
    assert frames[5].dlc == 5
    assert reader.malformed_summary() is None and reader.frames == 9


def test_candump_fd_64_bytes(tmp_path):
    payload = bytes(range(64))
    reader, frames = read_all(write(tmp_path / "fd.log",
                                    f"(1.000000) can0 600##0{payload.hex().upper()}\n"))
    assert len(frames) == 1 and frames[0].is_fd and bytes(frames[0].data) == payload
    assert not frames[0].bitrate_switch


BAD_LINES = [
    ("(1.0) can0 3D0#9C8", "bad data bytes"),                 # odd number of hex digits
    ("(1.0) can0 3D0#ZZ", "bad data bytes"),
    ("(1.0) can0 3D0#000102030405060708", "9 data bytes is not a valid CAN length"),
    ("(1.0) can0 3D0##1000102030405060708", "9 data bytes is not a valid CAN FD length"),
    ("(1.0) can0 3D#00", "bad frame id"),
    ("(1.0) can0 3D0G#00", "bad frame id"),
    ("(1.0) can0 3D000", "bad frame id"),                     # no '#'
    ("(1.0) can0 DFFFFFFF#00", "bad frame id"),               # > 29 bits, not an error frame
    ("(x) can0 3D0#00", "bad timestamp"),
    ("1.0 can0 3D0#00", "bad timestamp"),
    ("(nan) can0 3D0#00", "bad timestamp"),
    ("(1.0) can0", "expected '(time) channel id#data'"),
    ("(1.0) can0 3D0#00 R extra", "expected '(time) channel id#data'"),
    ("(1.0) can0 3D0##G00", "bad CAN FD flags"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[b[1] + "-" + str(i)
                                                        for i, b in enumerate(BAD_LINES)])
def test_candump_malformed_line_is_counted_with_its_number(tmp_path, line, reason):
    path = write(tmp_path / "bad.log", "(0.5) can0 100#01\n\n# a comment\n" + line +
                 "\n(2.0) can0 100#02\n")
    reader, frames = read_all(path)
    assert [bytes(m.data) for m in frames] == [b"\x01", b"\x02"]   # iteration went on
    assert reader.malformed == 1
    assert reader.first_malformed == [(4, reason)]
    assert reader.malformed_summary() == f"{path}: 1 malformed line(s) skipped: line 4 ({reason})"


def test_candump_many_malformed_lines_are_summarised(tmp_path):
    lines = []
    for n in range(1, 21):
        lines.append(f"({n}.0) can0 100#{n:02X}" if n % 3 else "garbage here")
    path = write(tmp_path / "bad.log", "\n".join(lines) + "\n")
    reader, frames = read_all(path)
    assert len(frames) == 14 and reader.malformed == 6
    assert [n for n, _ in reader.first_malformed] == [3, 6, 9, 12, 15][:FIRST_MALFORMED]
    assert reader.malformed_summary() == (
        f"{path}: 6 malformed line(s) skipped: "
        + ", ".join(f"line {n} (expected '(time) channel id#data')" for n in (3, 6, 9, 12, 15))
        + ", ...")


def test_candump_overlong_line(tmp_path):
    path = write(tmp_path / "long.log",
                 "(1.0) can0 100#01\n" + "(" * 5000 + "\n(2.0) can0 100#02\n")
    reader, frames = read_all(path)
    assert len(frames) == 2 and reader.first_malformed == [(2, "line too long")]


def test_candump_gz(tmp_path):
    path = tmp_path / "a.log.gz"
    path.write_bytes(gzip.compress(CANDUMP.encode()))
    assert detect_format(path) == "candump"
    reader, frames = read_all(path)
    plain_reader, plain = read_all(write(tmp_path / "a.log", CANDUMP))
    assert [summary(m) for m in frames] == [summary(m) for m in plain]


def test_candump_channel_filter(tmp_path):
    reader, frames = read_all(write(tmp_path / "a.log", CANDUMP), channel="can1")
    assert [m.arbitration_id for m in frames] == [0x123, 0x001]
    assert reader.frames == 2 and reader.other_channel == 7


def test_candump_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.log"
    path.write_bytes(b"(1.0) can0 100#01\r\n(2.0) can0 100#02\r\n")
    reader, frames = read_all(path)
    assert [bytes(m.data) for m in frames] == [b"\x01", b"\x02"] and reader.malformed == 0


# -- format_candump round trips ----------------------------------------------------------------

ROUND_TRIP = [
    can.Message(timestamp=1.5, channel="can0", arbitration_id=0x3D0, is_extended_id=False,
                data=bytes.fromhex("9C80157000000071")),
    can.Message(timestamp=2.25, channel="vcan0", arbitration_id=0x18FF50E5, is_extended_id=True,
                data=b"\x00\x01"),
    can.Message(timestamp=3.0, channel="can1", arbitration_id=0x123, is_extended_id=False,
                is_fd=True, bitrate_switch=True, data=bytes(range(12))),
    can.Message(timestamp=3.5, channel="can1", arbitration_id=0x124, is_extended_id=False,
                is_fd=True, error_state_indicator=True, data=bytes(range(64))),
    can.Message(timestamp=4.0, channel="can0", arbitration_id=0x7FF, is_extended_id=False,
                is_remote_frame=True, dlc=3),
    can.Message(timestamp=4.5, channel="can0", arbitration_id=0x1FFFFFFF, is_extended_id=True,
                is_remote_frame=True, dlc=0),
    can.Message(timestamp=5.0, channel="can0", arbitration_id=0x40, is_error_frame=True,
                dlc=0),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=["classic", "extended", "fd-brs", "fd64-esi",
                                                 "remote", "remote-ext", "error"])
def test_format_candump_round_trips(tmp_path, msg):
    line = format_candump(msg)
    reader, frames = read_all(write(tmp_path / "rt.log", line + "\n"))
    assert len(frames) == 1 and reader.malformed == 0, line
    got = frames[0]
    assert summary(got) == summary(msg)
    if msg.is_remote_frame:
        assert got.dlc == msg.dlc
    assert format_candump(got) == line


def test_format_candump_known_lines():
    assert [format_candump(m) for m in ROUND_TRIP[:2] + ROUND_TRIP[4:]] == [
        "(1.500000) can0 3D0#9C80157000000071",
        "(2.250000) vcan0 18FF50E5#0001",
        "(4.000000) can0 7FF#R3",
        "(4.500000) can0 1FFFFFFF#R",
        "(5.000000) can0 20000040#",
    ]
    assert format_candump(ROUND_TRIP[0], channel="vcan9").split()[1] == "vcan9"


def test_error_frame_payload_round_trips(tmp_path):
    line = "(1.000000) can0 20000004#0004000000000000"
    reader, frames = read_all(write(tmp_path / "err.log", line + "\n"))
    assert frames[0].is_error_frame and frames[0].arbitration_id == 0x4
    assert bytes(frames[0].data) == bytes.fromhex("0004000000000000")
    assert format_candump(frames[0]) == line


# -- streaming ---------------------------------------------------------------------------------


def test_candump_reader_streams_from_a_lazy_handle():
    produced = []

    def lines():
        for n in itertools.count():
            produced.append(n)
            if n >= 1_000_000:
                raise AssertionError("the reader tried to read the whole capture")
            yield f"({n}.000000) can0 100#{n & 0xFF:02X}\n"

    class LazyHandle:
        def __init__(self):
            self.lines = lines()

        def read(self, size=-1):
            assert size > 0, "the reader asked for the whole capture at once"
            text = ""
            while len(text) < size:
                line = next(self.lines, "")
                if not line:
                    break
                text += line
            return text

    reader = CandumpReader(Path("lazy.log"), LazyHandle(), None)
    it = iter(reader)
    first = next(it)
    # Read a block at a time: a few thousand lines ahead, never the file.
    assert bytes(first.data) == b"\x00" and len(produced) < 5000
    third = [next(it), next(it)][-1]
    assert third.timestamp == 2.0 and len(produced) < 5000


def test_candump_reader_reads_a_large_file_incrementally(tmp_path):
    path = tmp_path / "big.log"
    with path.open("w") as f:
        for n in range(200_000):
            f.write(f"({n}.000000) can0 1{n & 0xFF:02X}#0011223344556677\n")
    size = path.stat().st_size
    with open_capture(path) as reader:
        it = iter(reader)
        next(it)
        # the text layer has read ahead at most a buffer or two, not the file
        assert reader.handle.buffer.tell() < size // 50


def test_asc_reader_streams_from_a_lazy_handle():
    class LazyLines:
        def __init__(self):
            self.header = ["date Mon Jan 5 10:00:00.000 am 2026\n",
                           "base hex  timestamps absolute\n", "internal events logged\n",
                           "Begin Triggerblock Mon Jan 5 10:00:00.000 am 2026\n"]
            self.served = 0

            self.lines = 0
            self.pending = ""
            self.chars = 0      # characters handed out

        def read(self, size=-1):
            while len(self.pending) < size:
                self.lines += 1
                if self.lines <= len(self.header):
                    self.pending += self.header[self.lines - 1]
                elif self.lines > 1_000_000:
                    raise AssertionError("the reader tried to read the whole capture")
                else:
                    self.pending += (f"   {self.lines / 1000:.6f} 1  100  Rx   d 1 "
                                     f"{self.lines & 0xFF:02X}\n")
            out, self.pending = self.pending[:size], self.pending[size:]
            self.chars += len(out)
            return out

        def close(self):
            pass

    handle = LazyLines()
    reader = PythonCanReader(Path("lazy.asc"), handle, "asc", None)
    first = next(iter(reader))
    assert first.arbitration_id == 0x100 and handle.chars <= 64 * 1024     # one block


# -- Vector ASC --------------------------------------------------------------------------------



def check_asc(reader, frames):
    assert reader.format == "asc"
    assert [(m.channel, m.arbitration_id, m.is_error_frame) for m in frames] == [
        ("1", 0x3D0, False), ("2", 0x2B0, False), ("1", frames[2].arbitration_id, True),
        ("2", 0x18FF50E5, False), ("1", 0x3D0, False)]
    assert frames[0].is_extended_id is False and frames[3].is_extended_id is True
    assert bytes(frames[0].data) == bytes.fromhex("9C80157000000071")
    assert bytes(frames[4].data) == bytes.fromhex("968015700000006B")
    stamps = [m.timestamp - frames[0].timestamp for m in frames]
    assert stamps == pytest.approx([0.0, 0.01, 0.02, 0.04, 0.05])
    assert reader.malformed == 1 and reader.first_malformed[0][0] == 10
    assert "line 10" in reader.malformed_summary()


def test_asc_two_channels_error_frame_and_a_bad_line(tmp_path):
    reader, frames = read_all(write(tmp_path / "drive.asc", ASC))
    check_asc(reader, frames)


def test_asc_named_log_is_sniffed_as_asc(tmp_path):
    path = write(tmp_path / "drive.log", ASC)
    assert detect_format(path) == "asc"
    reader, frames = read_all(path)
    check_asc(reader, frames)


def test_asc_gz_named_log_gz_is_sniffed_as_asc(tmp_path):
    path = tmp_path / "drive.log.gz"
    path.write_bytes(gzip.compress(ASC.encode()))
    assert detect_format(path) == "asc"
    check_asc(*read_all(path))


def test_asc_channel_filter(tmp_path):
    reader, frames = read_all(write(tmp_path / "drive.asc", ASC), channel="2")
    assert [m.arbitration_id for m in frames] == [0x2B0, 0x18FF50E5]
    assert reader.other_channel == 3


def test_asc_frames_decode_through_the_pipeline(tmp_path):
    _, frames = read_all(write(tmp_path / "drive.asc", ASC))
    changes = list(SignalPipeline(demo_decoder()).run(frames))
    assert [(c.value, c.quality) for c in changes if c.path == REL] == [(62.4, VALID),
                                                                        (60.0, VALID)]


# -- PEAK TRC ----------------------------------------------------------------------------------

TRC_21 = """\
;$FILEVERSION=2.1
;$STARTTIME=46027.4166666667
;$COLUMNS=N,O,T,B,I,d,R,L,D
;
;   Start time: 05.01.2026 10:00:00.000.0
;-------------------------------------------------------------------------------
;   Message   Time    Type    ID     Rx/Tx
;   Number    Offset  |  Bus  [hex]  |  Reserved
;   |         [ms]    |  |    |      |  |  Data Length Code
;   |         |       |  |    |      |  |  |    Data [hex] ...
;---+-- ------+------ +- +- --+----- +- +- +--- +- -- -- -- -- -- -- --
      1        10.000 DT  1     03D0 Rx -  8    9C 80 15 70 00 00 00 71
      2        20.000 DT  2     02B0 Rx -  8    00 0F 00 00 00 00 00 BF
      3        30.000 DT  1     03D0 Rx -  8    9C 80 QQ 70 00 00 00 71
      4        40.000 DT  1 18FF50E5 Rx -  8    00 00 AC 41 64 00 00 00
      5        50.000 FB  2     0600 Rx -  12   00 01 02 03 04 05 06 07 08 09 0A 0B
      6        60.000 DT  1     03D0 Rx -  8    96 80 15 70 00 00 00 6B
"""


def test_trc_v21(tmp_path):
    reader, frames = read_all(write(tmp_path / "drive.trc", TRC_21))
    assert reader.format == "trc"
    assert [(m.channel, m.arbitration_id, m.is_extended_id, m.is_fd) for m in frames] == [
        ("1", 0x3D0, False, False), ("2", 0x2B0, False, False), ("1", 0x18FF50E5, True, False),
        ("2", 0x600, False, True), ("1", 0x3D0, False, False)]
    assert bytes(frames[0].data) == bytes.fromhex("9C80157000000071")
    assert bytes(frames[3].data) == bytes(range(12)) and frames[3].bitrate_switch
    # ;$STARTTIME is days since 1899-12-30: 46027.41666... = 2026-01-05 10:00 UTC
    assert frames[0].timestamp == pytest.approx(1767607200.010, abs=1e-3)
    assert frames[-1].timestamp - frames[0].timestamp == pytest.approx(0.05)
    assert reader.malformed == 1 and reader.first_malformed[0][0] == 14


TRC_11 = """\
;$FILEVERSION=1.1
;$STARTTIME=46027.4166666667
;
;   Message Number
;   |         Time Offset (ms)
;   |         |        Type
;   |         |        |        ID (hex)
;   |         |        |        |     Data Length Code
;   |         |        |        |     |   Data Bytes (hex) ...
;   |         |        |        |     |   |
;---+--   ----+----  --+--  ----+---  +  -+ -- -- -- -- -- -- --
     1)        10.0  Rx         03D0  8  9C 80 15 70 00 00 00 71
     2)        20.0  Rx         02B0  8  00 0F 00 00 00 00 00 BF
     3)        40.0  Rx     18FF50E5  8  00 00 AC 41 64 00 00 00
"""


def test_trc_v11(tmp_path):
    reader, frames = read_all(write(tmp_path / "drive.trc", TRC_11))
    assert [(m.channel, m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in frames] == [
        ("1", 0x3D0, False, bytes.fromhex("9C80157000000071")),
        ("1", 0x2B0, False, bytes.fromhex("000F0000000000BF")),
        ("1", 0x18FF50E5, True, bytes.fromhex("0000AC4164000000"))]
    assert reader.malformed == 0


def test_trc_bad_data_line_counts_and_reading_goes_on(tmp_path):
    text = TRC_11.replace("  8  00 0F 00", "  8  00 GG 00")
    reader, frames = read_all(write(tmp_path / "drive.trc", text))
    assert [m.arbitration_id for m in frames] == [0x3D0, 0x18FF50E5]
    assert reader.malformed == 1 and reader.first_malformed[0][0] == 13


def test_trc_without_columns_header_is_a_fatal_error(tmp_path):
    reader, frames = read_all(write(tmp_path / "bad.trc", ";$FILEVERSION=2.1\n"
                                                          "      1  10.000 DT 1 0100 Rx - 1 00\n"
                                                          "      2  20.000 DT 1 0100 Rx - 1 01\n"))
    assert frames == []
    assert reader.error is not None and "TRC" in reader.error


# -- BLF ---------------------------------------------------------------------------------------


def blf_messages() -> list[can.Message]:
    msgs = [can.Message(timestamp=1767225600.0 + n / 100, arbitration_id=0x3D0,
                        is_extended_id=False, channel=n % 2,
                        data=cluster_payload(n % 250, 512, 343)) for n in range(300)]
    msgs.append(can.Message(timestamp=1767225604.0, arbitration_id=0x18FF50E5,
                            is_extended_id=True, channel=0, data=bytes.fromhex("0000AC4164000000")))
    msgs.append(can.Message(timestamp=1767225604.5, arbitration_id=0x3D0, channel=1,
                            is_error_frame=True))
    return msgs


def write_blf(path: Path) -> list[can.Message]:
    msgs = blf_messages()
    writer = can.BLFWriter(str(path))
    for msg in msgs:
        writer.on_message_received(msg)
    writer.stop()
    return msgs


def test_blf_written_by_python_can_reads_back(tmp_path):
    path = tmp_path / "drive.blf"
    sent = write_blf(path)
    reader, frames = read_all(path)
    assert reader.format == "blf" and reader.error is None and reader.malformed == 0
    assert len(frames) == len(sent) == reader.frames
    for got, msg in zip(frames, sent):
        assert got.timestamp == pytest.approx(msg.timestamp, abs=1e-5)
        assert (got.arbitration_id, got.is_extended_id, got.is_error_frame) == (
            msg.arbitration_id, msg.is_extended_id, msg.is_error_frame)
        if not msg.is_error_frame:
            assert bytes(got.data) == bytes(msg.data)
        assert got.channel == str(msg.channel + 1)          # Vector numbers channels from 1


def test_blf_gz_and_channel_filter(tmp_path):
    plain = tmp_path / "drive.blf"
    write_blf(plain)
    packed = tmp_path / "drive.blf.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert detect_format(packed) == "blf"
    reader, frames = read_all(packed, channel="2")
    assert len(frames) == 151 and all(m.channel == "2" for m in frames)
    assert reader.other_channel == 151


def test_truncated_blf_does_not_raise_and_yields_a_prefix(tmp_path):
    path = tmp_path / "drive.blf"
    sent = write_blf(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.blf"
    cut.write_bytes(data[:len(data) * 2 // 3])
    reader, frames = read_all(cut)
    assert len(frames) < len(sent)
    assert [bytes(m.data) for m in frames] == [bytes(m.data) for m in sent[:len(frames)]]


def test_blf_cut_inside_the_first_object_header_reports_an_error(tmp_path):
    path = tmp_path / "drive.blf"
    write_blf(path)
    cut = tmp_path / "cut.blf"
    cut.write_bytes(path.read_bytes()[:150])        # 144-byte file header + 6 bytes
    reader, frames = read_all(cut)
    assert frames == [] and reader.error.startswith("BLF data unreadable after 0 frame(s)")
    assert not reader.not_a_capture                 # a BLF file, damaged


@pytest.mark.parametrize("where", ["after-file-header", "two-thirds", "last-bytes"])
def test_truncated_blf_reports_an_error(tmp_path, where):
    path = tmp_path / "drive.blf"
    write_blf(path)
    data = path.read_bytes()
    size = {"after-file-header": 144, "two-thirds": len(data) * 2 // 3,
            "last-bytes": len(data) - 10}[where]
    cut = tmp_path / "cut.blf"
    cut.write_bytes(data[:size])
    reader, _ = read_all(cut)
    assert reader.error is not None
    assert reader.malformed_summary().startswith(f"{cut}: ")


def test_not_a_blf_file_reports_an_error_without_raising(tmp_path):
    path = tmp_path / "fake.blf"
    path.write_bytes(b"NOPE" + bytes(200))
    reader, frames = read_all(path)
    assert frames == [] and reader.not_a_capture
    assert reader.error == "not a capture file (expected Vector BLF: Unexpected file format)"


# -- choosing a reader -------------------------------------------------------------------------


@pytest.mark.parametrize("name,fmt", [("a.log", "candump"), ("A.LOG", "candump"),
                                      ("a.candump", "candump"), ("a.asc", "asc"),
                                      ("a.asc.gz", "asc"), ("a.blf", "blf"), ("a.trc", "trc"),
                                      ("a.trc.gz", "trc")])
def test_detect_format_by_extension(tmp_path, name, fmt):
    assert detect_format(tmp_path / name) == fmt


def test_log_with_candump_content_after_blank_lines_is_candump(tmp_path):
    assert detect_format(write(tmp_path / "a.log", "\n\n(1.0) can0 100#00\n")) == "candump"


@pytest.mark.parametrize("name", ["a.txt", "a", "a.gz", "a.pcap"])
def test_unknown_extension_is_a_user_error(tmp_path, name):
    with pytest.raises(UserError, match="unknown capture format"):
        open_capture(tmp_path / name)


def test_format_override_and_unknown_format(tmp_path):
    path = write(tmp_path / "capture.txt", "(1.0) can0 100#00\n")
    reader, frames = read_all(path, fmt="candump")
    assert len(frames) == 1
    with pytest.raises(UserError, match="unknown capture format 'pcap'"):
        open_capture(path, "pcap")


def test_missing_capture_file(tmp_path):
    with pytest.raises(UserError) as info:
        open_capture(tmp_path / "nope.log")
    assert str(info.value) == f"{tmp_path / 'nope.log'}: capture file not found"


def test_capture_path_is_a_directory(tmp_path):
    folder = tmp_path / "dir.log"
    folder.mkdir()
    with pytest.raises(UserError, match="is a directory"):
        open_capture(folder)


# -- non-finite timestamps (issue 13.8) ----------------------------------------------------------

@pytest.mark.parametrize("stamp", ["nan", "inf", "-inf", "1e400"])
def test_trc_non_finite_timestamp_is_a_malformed_line(tmp_path, stamp):
    text = TRC_11.replace("        20.0  Rx", f"{stamp:>12}  Rx")
    assert stamp in text
    reader, frames = read_all(write(tmp_path / "drive.trc", text))
    assert [m.arbitration_id for m in frames] == [0x3D0, 0x18FF50E5]
    assert reader.malformed == 1 and reader.first_malformed == [(13, "bad timestamp")]


@pytest.mark.parametrize("stamp", ["nan", "inf", "-inf", "1e400"])
def test_candump_non_finite_timestamp_is_a_malformed_line(tmp_path, stamp):
    reader, frames = read_all(write(tmp_path / "a.log", "(1.0) can0 100#01\n"
                                    f"({stamp}) can0 100#02\n(2.0) can0 100#03\n"))
    assert [bytes(m.data) for m in frames] == [b"\x01", b"\x03"]
    assert reader.first_malformed == [(2, "bad timestamp")]


# -- memory bounded by the longest line (issue 13.4) ---------------------------------------------

HUGE = 48 * 1024 * 1024      # one line of 48 MiB without a newline before its end
CANDUMP_OK = "(1700000000.000000) can0 3D0#9C80157000000071\n"


def _huge_line_file(path: Path, head: str, tail: str, compress: bool = False) -> Path:
    opener = gzip.open(path, "wt", compresslevel=1) if compress else path.open("w")
    with opener as f:
        f.write(head)
        chunk = "A" * (1024 * 1024)
        for _ in range(HUGE // len(chunk)):
            f.write(chunk)
        f.write("\n" + tail)
    return path


@pytest.mark.parametrize("name, head, tail, fmt", [
    ("a.log", CANDUMP_OK, CANDUMP_OK, "candump"),
    ("a.log.gz", CANDUMP_OK, CANDUMP_OK, "candump"),
    ("a.asc", ASC.split("   0.000000")[0] + "   0.010000 1  3D0  Rx   d 1 01\n",
     "   0.020000 1  3D0  Rx   d 1 02\nEnd TriggerBlock\n", "asc"),
    ("b.log", ASC.split("   0.000000")[0] + "   0.010000 1  3D0  Rx   d 1 01\n",
     "   0.020000 1  3D0  Rx   d 1 02\nEnd TriggerBlock\n", "asc"),    # sniffed, then read
    ("a.trc", TRC_11.split("     2)")[0], "     2)        20.0  Rx         02B0  1  0F\n", "trc"),
    ("huge-first.log", "", CANDUMP_OK, "candump"),                       # sniffing meets it
])
def test_memory_is_bounded_by_the_longest_line_not_the_file(tmp_path, name, head, tail, fmt):
    """A reader (and format sniffing) never holds an overlong line: it is skipped to its
    newline in small chunks and counted malformed, and reading goes on after it."""
    import tracemalloc

    path = _huge_line_file(tmp_path / name, head, tail, compress=name.endswith(".gz"))
    tracemalloc.start()
    try:
        assert detect_format(path) == fmt
        reader, frames = read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a {HUGE}-byte line"
    assert len(frames) == (1 if name.startswith("huge") else 2)
    assert reader.malformed == 1 and reader.first_malformed[0][1] == "line too long"


# -- files that are no capture at all (issue 13.12) ----------------------------------------------

@pytest.mark.parametrize("name, content, detail", [
    ("g.asc", bytes(range(256)) * 20, "Vector ASC: no ASC header and no frame in"),
    ("t.asc", b"hello world\nthis is text\n", "Vector ASC: no ASC header and no frame in 2 "),
    ("g.trc", bytes(range(256)) * 20, "PEAK TRC: no TRC header and no frame in"),
    ("t.trc", b"hello world\nthis is text\n", "PEAK TRC: no TRC header and no frame in 2 "),
    ("g.blf", bytes(range(256)) * 20, "Vector BLF: "),
])
def test_garbage_is_not_a_capture(tmp_path, name, content, detail):
    path = tmp_path / name
    path.write_bytes(content)
    reader, frames = read_all(path)
    assert frames == [] and reader.not_a_capture, reader.error
    assert reader.error.startswith(f"not a capture file (expected {detail}"), reader.error


@pytest.mark.parametrize("name, text", [
    ("empty.asc", ""), ("header-only.asc", ASC.split("   0.000000")[0] + "End TriggerBlock\n"),
    ("header-only.trc", TRC_11.split("     1)")[0]),
])
def test_an_empty_capture_is_still_a_capture(tmp_path, name, text):
    reader, frames = read_all(write(tmp_path / name, text))
    assert frames == [] and not reader.not_a_capture and reader.error is None
