"""agent.can.dbc: loading real and broken DBC files, and decoding real messages of real DBCs.

The real DBCs are the opendbc files in ../shared/data (read in place, never copied here).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import cantools
import pytest

from agent.can.dbc import EXTENDED_KEY, load_dbcs
from agent.signals.decoder import Decoder
from agent.errors import ConfigError
from agent.signals.mapping import load_mapping
from coredata import DBC_HEADER, DEMO_DBC, SHARED_DATA, frame, needs_shared_data, one_line, write

VW = SHARED_DATA / "vw_mqb.dbc"
HYUNDAI = SHARED_DATA / "hyundai_2015_ccan.dbc"
FORD = SHARED_DATA / "ford_cgea1_2_bodycan_2011.dbc"
GM = SHARED_DATA / "gm_global_a_lowspeed_1818125.dbc"


def dbc_error(paths: list[Path]) -> str:
    with pytest.raises(ConfigError) as info:
        load_dbcs(paths)
    message = str(info.value)
    assert one_line(message), message
    return message


def decoder_for(tmp_path: Path, dbc: Path, signals_yaml: str) -> Decoder:
    mapping = load_mapping(write(tmp_path / "m.yaml", "signals:\n" + signals_yaml))
    return Decoder(load_dbcs([dbc]), mapping)


def values(decoder: Decoder, msg) -> dict:
    return {decoder.paths[i]: (v, q) for i, v, q in decoder.decode(msg)}


# -- the demo DBC ----------------------------------------------------------------------------


def test_demo_dbc_loads_strictly_without_warnings():
    vdb = load_dbcs([DEMO_DBC])
    assert vdb.warnings == []
    assert sorted(m.name for m in vdb.by_key.values()) == sorted(
        ["EngineData", "SteeringAngle", "WheelSpeeds", "BrakeStatus", "Transmission",
         "BodyStatus", "WindowStatus", "Cluster", "AmbientConditions"])
    ambient = vdb.find("AmbientConditions")
    assert ambient.frame_id == 0x18FF50E5 and ambient.is_extended_frame
    assert vdb.by_key[0x18FF50E5 | EXTENDED_KEY] is ambient
    assert 0x18FF50E5 not in vdb.by_key            # 29-bit ids are keyed apart from 11-bit ids
    assert vdb.find(0x3D0).name == "Cluster" and vdb.find(0x18FF50E5) is ambient
    assert vdb.find("Nope") is None and vdb.find(0x3D1) is None
    assert vdb.source[0x3D0] == DEMO_DBC


# -- the real DBCs ---------------------------------------------------------------------------

REAL = [
    # file, loads only without strict checks, messages the README names: (name, id, 29-bit)
    ("vw_mqb.dbc", True, [("Kombi_03", 0x6B8, False), ("ESP_08", 0x11E, False)]),
    ("hyundai_2015_ccan.dbc", False, [("CLU13", 0x50C, False), ("GW_DDM_PE", 0x521, False)]),
    ("ford_cgea1_2_bodycan_2011.dbc", False, [("Ajar_Stat", 0x3B1, False),
                                              ("Engine_Data_MS", 0x423, False)]),
    ("gm_global_a_lowspeed_1818125.dbc", True, [("Fuel_Information", 0x800000, True),
                                                ("Door_Open_Switch_Status_LS", 0x608000, True)]),
]


@needs_shared_data
@pytest.mark.parametrize("name,relaxed,messages", REAL, ids=[r[0] for r in REAL])
def test_real_dbc_loads_and_has_the_readme_messages(name, relaxed, messages):
    path = SHARED_DATA / name
    vdb = load_dbcs([path])
    assert len(vdb.by_key) > 100
    if relaxed:
        assert len(vdb.warnings) == 1
        assert vdb.warnings[0].startswith(f"{path}: loaded without cantools' strict checks (")
        assert "overlapping" in vdb.warnings[0]
    else:
        assert vdb.warnings == []
    for msg_name, frame_id, extended in messages:
        msg = vdb.find(msg_name)
        assert msg is not None, msg_name
        assert (msg.frame_id, msg.is_extended_frame) == (frame_id, extended)
        assert vdb.find(frame_id) is msg
        key = frame_id | EXTENDED_KEY if extended else frame_id
        assert vdb.by_key[key] is msg and vdb.source[key] == path


@needs_shared_data
def test_gm_lowspeed_is_a_29_bit_bus():
    vdb = load_dbcs([GM])
    extended = [m for m in vdb.by_key.values() if m.is_extended_frame]
    assert len(extended) >= 360
    assert all(key & EXTENDED_KEY for key, m in vdb.by_key.items() if m.is_extended_frame)


@needs_shared_data
def test_two_real_dbcs_of_different_cars_conflict_and_the_error_names_both():
    message = dbc_error([VW, HYUNDAI])
    assert message.startswith(f"{HYUNDAI}: message ") and f"is also defined in {VW} as " in message


@needs_shared_data
def test_real_dbcs_that_do_not_overlap_load_together():
    vdb = load_dbcs([FORD, GM])
    assert vdb.source[0x3B1] == FORD and vdb.source[0x800000 | EXTENDED_KEY] == GM
    assert len(vdb.warnings) == 1 and vdb.warnings[0].startswith(str(GM))


# -- decoding real messages with hand-built frames ---------------------------------------------


@needs_shared_data
def test_hyundai_clu13_distance_to_empty(tmp_path):
    dec = decoder_for(tmp_path, HYUNDAI,
                      "  Vehicle.Powertrain.FuelSystem.Range:\n    message: CLU13\n"
                      "    signal: CF_Clu_DTE\n    scale: 1000\n    invalid: [1023]\n")
    # CF_Clu_DTE 24|10@1+: raw 513 = 0x201 -> byte 3 = 0x01, byte 4 bits 0-1 = 0b10
    data = bytes([0, 0, 0, 0x01, 0x02, 0, 0, 0])
    assert values(dec, frame(0x50C, data, 1.0)) == {
        "Vehicle.Powertrain.FuelSystem.Range": (513000, "valid")}
    # raw 1023 (all ten bits set) is the mapping's sentinel
    assert values(dec, frame(0x50C, bytes([0, 0, 0, 0xFF, 0x03, 0, 0, 0]), 2.0)) == {
        "Vehicle.Powertrain.FuelSystem.Range": (None, "invalid")}


@needs_shared_data
def test_hyundai_gw_ddm_pe_doors_and_trunk_with_raw_value_keys(tmp_path):
    dec = decoder_for(tmp_path, HYUNDAI, "".join(
        f"  {path}:\n    message: GW_DDM_PE\n    signal: {sig}\n    values: {{0: false, 1: true}}\n"
        for path, sig in [("Vehicle.Cabin.Door.Row1.DriverSide.IsOpen", "C_DRVDoorStatus"),
                          ("Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen", "C_ASTDoorStatus"),
                          ("Vehicle.Cabin.Door.Row2.DriverSide.IsOpen", "C_RLDoorStatus"),
                          ("Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen", "C_RRDoorStatus"),
                          ("Vehicle.Body.Trunk.Rear.IsOpen", "C_TrunkStatus")]))
    # byte 0: DRV=1 (bits 0-1), AST=0, RL=1 (bits 4-5), RR=3 (bits 6-7); byte 1: trunk=1
    data = bytes([0b11_01_00_01, 0x01, 0, 0, 0, 0, 0, 0])
    assert values(dec, frame(0x521, data, 1.0)) == {
        "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen": (True, "valid"),
        "Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen": (False, "valid"),
        "Vehicle.Cabin.Door.Row2.DriverSide.IsOpen": (True, "valid"),
        "Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen": (None, "invalid"),  # 3: not in values
        "Vehicle.Body.Trunk.Rear.IsOpen": (True, "valid"),
    }


@needs_shared_data
def test_ford_ajar_stat_big_endian_one_bit_signals(tmp_path):
    dec = decoder_for(tmp_path, FORD, "".join(
        f"  {path}:\n    message: 0x3B1\n    signal: {sig}\n    values: {{1: true, 0: false}}\n"
        for path, sig in [("Vehicle.Cabin.Door.Row1.DriverSide.IsOpen", "DF_Door_Ajar_Status"),
                          ("Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen", "PF_Door_Ajar_Status"),
                          ("Vehicle.Cabin.Door.Row2.DriverSide.IsOpen", "DR_Door_Ajar_Status"),
                          ("Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen", "PR_Door_Ajar_Status"),
                          ("Vehicle.Body.Trunk.Rear.IsOpen", "Decklid_Ajar_Status"),
                          ("Vehicle.Body.Hood.IsOpen", "Hood_Ajar_Status")]))
    # big-endian start bits: DF=7 (byte 0 MSB), PF=6, DR=5, PR=4, Decklid=3, Hood=0
    data = bytes([0b1000_1001, 0, 0, 0, 0, 0, 0, 0])
    assert values(dec, frame(0x3B1, data, 1.0)) == {
        "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen": (True, "valid"),
        "Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen": (False, "valid"),
        "Vehicle.Cabin.Door.Row2.DriverSide.IsOpen": (False, "valid"),
        "Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen": (False, "valid"),
        "Vehicle.Body.Trunk.Rear.IsOpen": (True, "valid"),
        "Vehicle.Body.Hood.IsOpen": (True, "valid"),
    }
    data = bytes([0b0101_0000, 0, 0, 0, 0, 0, 0, 0])
    assert values(dec, frame(0x3B1, data, 2.0)) == {
        "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen": (False, "valid"),
        "Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen": (True, "valid"),
        "Vehicle.Cabin.Door.Row2.DriverSide.IsOpen": (False, "valid"),
        "Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen": (True, "valid"),
        "Vehicle.Body.Trunk.Rear.IsOpen": (False, "valid"),
        "Vehicle.Body.Hood.IsOpen": (False, "valid"),
    }


@needs_shared_data
def test_vw_kombi_03_fuel_percent_and_litres(tmp_path):
    dec = decoder_for(tmp_path, VW,
                      "  Vehicle.Powertrain.FuelSystem.RelativeLevel:\n    message: Kombi_03\n"
                      "    signal: KBI_Tankfuellstand_Prozent\n"
                      "  Vehicle.Powertrain.FuelSystem.AbsoluteLevel:\n    message: Kombi_03\n"
                      "    signal: KBI_Tankinhalt_hochaufl\n")
    # percent 18|7: raw 62 -> byte 2 bits 2-7 = 0b111110, byte 3 bit 0 = 0
    # litres 26|14 (0.01 l): raw 3430 -> byte 3 bits 2-7 = 3430 & 63 = 38, byte 4 = 3430 >> 6 = 53
    data = bytes([0, 0, 0b1111_1000, 38 << 2, 53, 0, 0, 0])
    raw = load_dbcs([VW]).find("Kombi_03").decode_simple(data, False, False)
    assert (raw["KBI_Tankfuellstand_Prozent"], raw["KBI_Tankinhalt_hochaufl"]) == (62, 3430)
    assert values(dec, frame(0x6B8, data, 1.0)) == {
        "Vehicle.Powertrain.FuelSystem.RelativeLevel": (62, "valid"),
        "Vehicle.Powertrain.FuelSystem.AbsoluteLevel": (34.3, "valid"),   # rounded to 0.01 l
    }
    # 101 % is outside the DBC's [0|100]: invalid, not a number
    over = bytes([0, 0, (101 & 63) << 2, 101 >> 6, 53, 0, 0, 0])
    assert values(dec, frame(0x6B8, over, 2.0))[
        "Vehicle.Powertrain.FuelSystem.RelativeLevel"] == (None, "invalid")


@needs_shared_data
def test_gm_fuel_information_29_bit_fuel_percent(tmp_path):
    dec = decoder_for(tmp_path, GM,
                      "  Vehicle.Powertrain.FuelSystem.RelativeLevel:\n"
                      "    message: Fuel_Information\n    signal: FlLvlPct\n")
    # FlLvlPct 15|8@0 (0.392157 %/bit): byte 1 = 51 -> 20.000007 %
    data = bytes([0, 51, 0, 0, 0, 0])
    got = values(dec, frame(0x800000, data, 1.0, extended=True))
    assert dec.counters.undecodable == 0
    assert got["Vehicle.Powertrain.FuelSystem.RelativeLevel"] == (pytest.approx(20.000007), "valid")


@needs_shared_data
def test_gm_ajar_switches_29_bit_frames_need_the_extended_flag(tmp_path):
    dec = decoder_for(tmp_path, GM,
                      "  Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen:\n"
                      "    message: Passenger_Door_Status_LS\n    signal: PDAjrSwAtv\n"
                      "    values: {0: false, 1: true}\n"
                      "  Vehicle.Body.Trunk.Rear.IsOpen:\n"
                      "    message: Rear_Closure_Ajar_Switch_Status\n    signal: RrClosAjarSwAct\n"
                      "    values: {0: false, 1: true}\n")
    # one-byte frames; the ajar switch is bit 0 (big-endian 0|1)
    assert values(dec, frame(0x2F6000, bytes([0x01]), 1.0, extended=True)) == {
        "Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen": (True, "valid")}
    assert values(dec, frame(0x6AA000, bytes([0x02]), 1.0, extended=True)) == {
        "Vehicle.Body.Trunk.Rear.IsOpen": (False, "valid")}
    assert values(dec, frame(0x6AA000, bytes([0x03]), 2.0, extended=True)) == {
        "Vehicle.Body.Trunk.Rear.IsOpen": (True, "valid")}
    # the same number without the 29-bit flag is another frame
    assert dec.decode(frame(0x2F6000, bytes([0x01]), 3.0, extended=False)) == ()
    assert dec.counters.unmapped == 1 and dec.counters.undecodable == 0
    assert dec.can_filters() == [
        {"can_id": 0x2F6000, "can_mask": 0x1FFFFFFF, "extended": True},
        {"can_id": 0x6AA000, "can_mask": 0x1FFFFFFF, "extended": True}]


# -- broken DBC files ------------------------------------------------------------------------


@needs_shared_data
def test_dbc_truncated_inside_its_header_is_not_usable(tmp_path):
    cut = write(tmp_path / "cut.dbc", "")
    cut.write_bytes(HYUNDAI.read_bytes()[:100])
    message = dbc_error([cut])
    assert message.startswith(f"{cut}: not a usable DBC file"), message


def test_dbc_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "bad.dbc", DBC_HEADER + "BO_ 256 One: 8 ECU\n"
                                                    " SG_ A : 0|8@1+ (1,0) [0|255] \"\" ECU\n"
                                                    " SG_ B : 8|\n\nBO_ 257 Two: 8 ECU\n")
    message = dbc_error([path])
    # the parser gives up at the statement after the broken SG_ line (line 16)
    assert message == f"{path}:16:1: DBC syntax error in: BO_ 257 Two: 8 ECU"


@needs_shared_data
def test_dbc_truncated_mid_signal_line_is_an_error(tmp_path):
    src = HYUNDAI.read_bytes()
    cut = tmp_path / "cut.dbc"
    cut.write_bytes(src[:src.index(b"SG_ CF_Clu_DTE") + len(b"SG_ CF_Clu_DTE : 24|10")])
    message = dbc_error([cut])
    assert message.startswith(f"{cut}:"), message


def test_dbc_without_messages(tmp_path):
    path = write(tmp_path / "empty.dbc", DBC_HEADER)
    with pytest.raises(ConfigError) as info:
        load_dbcs([path])
    assert "no messages" in str(info.value)


def test_dbc_without_messages_names_the_file(tmp_path):
    path = write(tmp_path / "empty.dbc", DBC_HEADER)
    assert dbc_error([path]).startswith(f"{path}:")


def test_factor_written_without_leading_zero_loads_with_warning_and_decodes(tmp_path):
    path = write(tmp_path / "dot.dbc", DBC_HEADER + "BO_ 256 Dot: 2 ECU\n"
                 ' SG_ Quarter : 0|8@1+ (.25,-.5) [-.5|63.25] "" Vector__XXX\n')
    vdb = load_dbcs([path])
    signal = vdb.find("Dot").signals[0]
    assert (signal.scale, signal.offset) == (0.25, -0.5)
    assert (signal.minimum, signal.maximum) == (-0.5, 63.25)
    assert vdb.warnings == [f"{path}: numbers written without a leading zero (like .25) were "
                            "read as 0.25"]
    mapping = load_mapping(write(tmp_path / "m.yaml", "signals:\n  Vehicle.Cabin.Sunroof.Position:"
                                                      "\n    message: Dot\n    signal: Quarter\n"))
    dec = Decoder(vdb, mapping)
    # raw 10 * 0.25 - 0.5 = 2.0; raw 255 -> 63.25
    assert dec.decode(frame(0x100, bytes([10, 0]), 1.0)) == [(0, 2.0, "valid")]
    assert dec.decode(frame(0x100, bytes([255, 0]), 2.0)) == [(0, 63.25, "valid")]


@pytest.mark.parametrize("garbage", [bytes(range(256)) * 4,
                                     b"\x89PNG\r\n\x1a\n" + bytes(200),
                                     b"PK\x03\x04" + bytes(300)],
                         ids=["all-bytes", "png", "zip"])
def test_binary_garbage_is_a_one_line_error(tmp_path, garbage):
    path = tmp_path / "garbage.dbc"
    path.write_bytes(garbage)
    assert dbc_error([path]).startswith(f"{path}:")


def test_gzipped_dbc_is_a_one_line_error(tmp_path):
    path = tmp_path / "demo.dbc"
    path.write_bytes(gzip.compress(DEMO_DBC.read_bytes(), mtime=0))
    assert dbc_error([path]).startswith(f"{path}:")


def test_binary_garbage_error_has_no_control_characters(tmp_path):
    path = tmp_path / "garbage.dbc"
    path.write_bytes(b"\x00\x1b[2J\x0b\x0cgarbage\r\x1c\n")
    message = dbc_error([path])
    assert message.isprintable(), repr(message)


def test_same_frame_id_in_two_files_names_both(tmp_path):
    a = write(tmp_path / "a.dbc", DBC_HEADER + "BO_ 256 One: 2 ECU\n"
                                               ' SG_ X : 0|8@1+ (1,0) [0|255] "" ECU\n')
    b = write(tmp_path / "b.dbc", DBC_HEADER + "BO_ 256 Two: 2 ECU\n"
                                               ' SG_ Y : 0|8@1+ (1,0) [0|255] "" ECU\n')
    message = dbc_error([a, b])
    assert message == f"{b}: message Two (0x100) is also defined in {a} as One"


def test_same_message_name_in_two_files_names_both(tmp_path):
    a = write(tmp_path / "a.dbc", DBC_HEADER + "BO_ 256 Same: 2 ECU\n"
                                               ' SG_ X : 0|8@1+ (1,0) [0|255] "" ECU\n')
    b = write(tmp_path / "b.dbc", DBC_HEADER + "BO_ 257 Same: 2 ECU\n"
                                               ' SG_ Y : 0|8@1+ (1,0) [0|255] "" ECU\n')
    message = dbc_error([a, b])
    assert message.startswith(f"{b}: message name Same is also defined in {a}")


def test_same_number_as_11_and_29_bit_id_in_two_files_is_no_conflict(tmp_path):
    a = write(tmp_path / "a.dbc", DBC_HEADER + "BO_ 256 Short: 2 ECU\n"
                                               ' SG_ X : 0|8@1+ (1,0) [0|255] "" ECU\n')
    b = write(tmp_path / "b.dbc", DBC_HEADER + f"BO_ {0x100 | 0x80000000} Long: 2 ECU\n"
                                               ' SG_ Y : 0|8@1+ (1,0) [0|255] "" ECU\n')
    vdb = load_dbcs([a, b])
    assert vdb.find(0x100).name == "Short"               # 11-bit first
    assert vdb.by_key[0x100 | EXTENDED_KEY].name == "Long"
    assert vdb.source[0x100] == a and vdb.source[0x100 | EXTENDED_KEY] == b


def test_missing_dbc_file(tmp_path):
    assert dbc_error([tmp_path / "nope.dbc"]) == f"{tmp_path / 'nope.dbc'}: DBC file not found"


def test_dbc_path_is_a_directory(tmp_path):
    assert dbc_error([tmp_path]) == f"{tmp_path}: DBC file is a directory"


def test_cp1252_text_in_comments_loads(tmp_path):
    path = tmp_path / "umlaut.dbc"
    path.write_bytes((DBC_HEADER + "BO_ 256 Tuer: 1 ECU\n"
                      ' SG_ Fahrertuer : 0|1@1+ (1,0) [0|1] "" ECU\n\n'
                      'CM_ SG_ 256 Fahrertuer "T\xfcrkontakt Fahrert\xfcr";\n').encode("cp1252"))
    vdb = load_dbcs([path])
    assert vdb.find("Tuer").signals[0].comment == "Türkontakt Fahrertür"


def test_cantools_agrees_with_the_demo_dbc_loaded_directly():
    ours = load_dbcs([DEMO_DBC]).find("Cluster")
    theirs = cantools.database.load_file(DEMO_DBC).get_message_by_name("Cluster")
    assert [(s.name, s.start, s.length, s.byte_order) for s in ours.signals] == \
        [(s.name, s.start, s.length, s.byte_order) for s in theirs.signals]


# -- issue 16: what cantools reads, we read ------------------------------------------------------

DOORS = (DBC_HEADER + "BO_ 945 Doors: 2 ECU\n"
         ' SG_ DoorFL : 0|1@1+ (1,0) [0|1] "" ECU\n'
         ' SG_ Display : 8|2@1+ (1,0) [0|3] "" ECU\n\n')


def test_vector_independent_signal_pseudo_message_is_not_truncation(tmp_path):
    """CANdb++ keeps unused signals in VECTOR__INDEPENDENT_SIG_MSG; cantools drops it."""
    text = (DOORS + "BO_ 3221225472 VECTOR__INDEPENDENT_SIG_MSG: 0 Vector__XXX\n"
            ' SG_ Unused1 : 0|8@1+ (1,0) [0|0] "" Vector__XXX\n'
            ' SG_ Unused2 : 8|8@1+ (1,0) [0|0] "" Vector__XXX\n\n')
    vdb = load_dbcs([write(tmp_path / "v.dbc", text)])
    assert sorted(vdb.by_name) == ["Doors"] and vdb.warnings == []
    # The check against truncation still holds around it.
    cut = write(tmp_path / "cut.dbc", text + 'BO_ 946 Two: 8 ECU\n SG_ X : 0|8@1+ (1,0) '
                '[0|255] "" ECU\n SG_ Y : 8|8@1+ (1,0) [0')
    assert dbc_error([cut]) == (f"{cut}: looks truncated or damaged: 2 messages and 4 signals "
                                "declared, 2 and 3 read")


def test_comment_line_starting_with_sg_is_text_not_a_signal(tmp_path):
    text = DOORS + ('CM_ BO_ 945 "Doors of the car.\n SG_ DoorFL is the driver\'s door,\n'
                    'BO_ and so on";\n')
    vdb = load_dbcs([write(tmp_path / "c.dbc", text)])
    assert [s.name for s in vdb.find("Doors").signals] == ["DoorFL", "Display"]


def test_cantools_detail_is_kept_on_one_line_with_the_dbc_line(tmp_path):
    path = write(tmp_path / "val.dbc", DOORS + 'VAL_ 945 DoorFL 1 "OPEN" 0 "CLOSED" ;\n'
                                               'VAL_ 945 DoorFR 1 "OPEN" 0 "CLOSED" ;\n')
    line = DOORS.count("\n") + 2
    assert dbc_error([path]) == (f"{path}:{line}: not a usable DBC file: unused VAL_ entries "
                                 "in DBC: VAL_ 945 DoorFR")


UTF8_NAME = "Display “Leading vehicle departure alert”"
UTF8_DBC = DOORS + f'VAL_ 945 Display 1 "{UTF8_NAME}" 0 "Off" ;\n'
UTF8_MAPPING = ("  Vehicle.Test.Display:\n    message: Doors\n    signal: Display\n"
                f"    values: {{'{UTF8_NAME}': true, 'Off': false}}\n")


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_utf8_dbc_value_names_can_be_mapped(tmp_path, bom):
    path = tmp_path / "utf8.dbc"
    path.write_bytes(bom + UTF8_DBC.encode("utf-8"))
    dec = decoder_for(tmp_path, path, UTF8_MAPPING)
    assert values(dec, frame(945, bytes([0, 1]), 1.0)) == {"Vehicle.Test.Display": (True, "valid")}


def test_encoding_override_per_dbc_entry(tmp_path):
    """A file that happens to be valid UTF-8 but was written in cp1252: `encoding` says so."""
    from agent.signals.vehicle import load_vehicle

    name = "Fahrertür"
    dbc = tmp_path / "cp.dbc"
    dbc.write_bytes((DOORS + f'VAL_ 945 Display 1 "{name}" 0 "Off" ;\n').encode("utf-8"))
    as_cp1252 = name.encode("utf-8").decode("cp1252")           # "FahrertÃ¼r"
    write(tmp_path / "m.yaml", "signals:\n  Vehicle.Test.Display:\n    message: Doors\n"
          f"    signal: Display\n    values: {{'{as_cp1252}': true, 'Off': false}}\n")
    config = write(tmp_path / "c.yaml", "vehicle_id: V1\nmapping: m.yaml\n"
                   "dbc: [{path: cp.dbc, encoding: cp1252}]\n")
    assert load_vehicle(config).config.dbc_encodings == ("cp1252",)
    detected = write(tmp_path / "d.yaml", "vehicle_id: V1\nmapping: m.yaml\ndbc: [cp.dbc]\n")
    with pytest.raises(ConfigError, match="not a value of Display"):
        load_vehicle(detected)
    bad = write(tmp_path / "b.yaml", "vehicle_id: V1\nmapping: m.yaml\n"
                "dbc: [{path: cp.dbc, encoding: klingon}]\n")
    with pytest.raises(ConfigError) as info:
        load_vehicle(bad)
    assert str(info.value) == (f"{bad}: dbc.0.encoding: unknown text encoding 'klingon' "
                               "(e.g. utf-8, cp1252, latin-1)")
