"""agent.signals.decoder.Decoder with the demo vehicle: known frames -> known published values."""

from __future__ import annotations

import math
import struct

import can
import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.can.dbc import EXTENDED_KEY, load_dbcs
from agent.errors import ConfigError
from agent.signals.decoder import Decoder
from agent.signals.mapping import load_mapping
from agent.signals.model import INVALID, QUALITIES, VALID
from coredata import (ABS, AIR, AMBIENT_ID, BODY_ID, CLOSED, CLUSTER_ID, CLUSTER_PATHS, EXT_DBC,
                      DBC_HEADER, DEMO_DBC, ERROR, HOOD, IS_LOCKED, IS_OPEN, LOW, OPEN, RANGE,
                      REL, SNA, TRUNK, WINDOW_ID, WINDOWS, ambient, ambient_payload, body,
                      body_payload, checksum, cluster, cluster_payload, demo_decoder, frame,
                      published, window, window_payload, write)


@pytest.fixture
def dec():
    return demo_decoder()


@pytest.fixture(scope="module")
def demo_db():
    return cantools.database.load_file(DEMO_DBC)


# -- the hand packers agree with cantools (checked once) --------------------------------------


def test_hand_packed_cluster_matches_cantools(demo_db):
    msg = demo_db.get_message_by_name("Cluster")
    for fuel, rng, litres, low, counter in [(156, 512, 343, 0, 0), (255, 1023, 1023, 1, 15),
                                            (1, 3, 5, 1, 9), (200, 700, 999, 0, 4)]:
        mine = cluster_payload(fuel, rng, litres, low, counter)
        theirs = msg.encode({"FuelLevelPct": fuel, "RangeKm": rng, "FuelLitres": litres,
                             "LowFuelWarning": low, "ClusterCounter": counter,
                             "ClusterChecksum": mine[7]}, scaling=False, strict=False)
        assert mine == theirs


def test_hand_packed_body_window_ambient_match_cantools(demo_db):
    body_msg = demo_db.get_message_by_name("BodyStatus")
    mine = body_payload(doors=(OPEN, CLOSED, ERROR, SNA), locks=(1, 0, 1, 1), trunk=OPEN,
                        hood=SNA, counter=11)
    assert mine == body_msg.encode({
        "DoorFL": 1, "DoorFR": 0, "DoorRL": 2, "DoorRR": 3, "LockFL": 1, "LockFR": 0,
        "LockRL": 1, "LockRR": 1, "Trunk": 1, "Hood": 3, "BodyCounter": 11,
        "BodyChecksum": mine[7]}, scaling=False)
    win = demo_db.get_message_by_name("WindowStatus")
    assert window_payload(2, 99, 1) == win.encode(
        {"WindowIndex": 2, "WindowPosition": 99, "WindowMoving": 1}, scaling=False)
    amb = demo_db.get_message_by_name("AmbientConditions")
    assert ambient_payload(21.5, 100) == amb.encode({"AmbientTemp": 21.5,
                                                     "AmbientHumidity": 50.0})


# -- known frames, hard-coded bytes -----------------------------------------------------------


def test_cluster_frame_by_hand(dec):
    # FuelLevelPct raw 156 = 0x9C (x0.4 = 62.4 %), RangeKm raw 512 -> byte 1 = 0x80, byte 2 top
    # bits 00; FuelLitres raw 343 = 0b0101010111 -> byte 2 low 6 bits 010101, byte 3 high nibble
    # 0111; checksum (0x9C+0x80+0x15+0x70 + 0xD0) & 0xFF = 0x71
    data = bytes.fromhex("9C80157000000071")
    assert data == cluster_payload(156, 512, 343)
    updates = dec.decode(frame(CLUSTER_ID, data, 1.0))
    assert published(dec, updates) == {
        REL: (62.4, VALID),
        ABS: (34.3, VALID),
        RANGE: (512000, VALID),        # km -> m, scale 1000
        LOW: (False, VALID),
    }
    assert [dec.paths[i] for i, _, _ in updates] == CLUSTER_PATHS   # mapping order
    assert type(published(dec, updates)[RANGE][0]) is int


def test_cluster_low_fuel_and_resolution(dec):
    # FuelLevelPct raw 20 -> 8.0 %, range 1 km, 0.1 l, low fuel bit 27 set (byte 3 = 0x18)
    data = bytes([20, 0x00, 0x40, 0x18, 0, 0, 0, 0])
    assert data[:4] == cluster_payload(20, 1, 1, low=1)[:4]
    assert published(dec, dec.decode(frame(CLUSTER_ID, data, 1.0))) == {
        REL: (8.0, VALID), ABS: (0.1, VALID), RANGE: (1000, VALID), LOW: (True, VALID)}


@pytest.mark.parametrize("fuel,litres,rng,expected", [
    (0, 0, 0, (0.0, 0.0, 0)),
    (1, 555, 1022, (0.4, 55.5, 1022000)),        # 1022 km is the DBC maximum
    (250, 1000, 77, (100.0, 100.0, 77000)),      # 250 x 0.4 = 100.00000000000001: in range
    (3, 7, 333, (1.2, 0.7, 333000)),              # no float noise: 3 x 0.4, 7 x 0.1
])
def test_cluster_values_are_rounded_to_the_signal_resolution(dec, fuel, litres, rng, expected):
    got = published(dec, dec.decode(cluster(1.0, fuel, rng, litres)))
    assert (got[REL][0], got[ABS][0], got[RANGE][0]) == expected
    assert {q for _, q in got.values()} == {VALID}


def test_body_status_doors_locks_trunk_hood(dec):
    # byte 0: FL=OPEN(1) FR=CLOSED RL=CLOSED RR=OPEN -> 0b01_00_00_01; byte 1: locks FL,RR
    # (bits 0, 3), trunk OPEN (bits 4-5 = 01), hood CLOSED
    data = bytes([0x41, 0x19, 0, 0, 0, 0, 0, 0])
    data = data[:7] + bytes([checksum(data, BODY_ID)])
    assert data == body_payload(doors=(OPEN, CLOSED, CLOSED, OPEN), locks=(1, 0, 0, 1),
                                trunk=OPEN)
    got = published(dec, dec.decode(frame(BODY_ID, data, 1.0)))
    assert [got[p] for p in IS_OPEN] == [(True, VALID), (False, VALID), (False, VALID),
                                         (True, VALID)]
    assert [got[p] for p in IS_LOCKED] == [(True, VALID), (False, VALID), (False, VALID),
                                           (True, VALID)]
    assert got[TRUNK] == (True, VALID) and got[HOOD] == (False, VALID)
    assert all(type(v) is bool for v, _ in got.values())


@pytest.mark.parametrize("door", range(4))
def test_each_door_bit_field_maps_to_its_own_path(dec, door):
    doors = [CLOSED] * 4
    doors[door] = OPEN
    locks = [0] * 4
    locks[door] = 1
    got = published(dec, dec.decode(body(1.0, doors=tuple(doors), locks=tuple(locks))))
    assert [got[p][0] for p in IS_OPEN] == [i == door for i in range(4)]
    assert [got[p][0] for p in IS_LOCKED] == [i == door for i in range(4)]


def test_hood_open_trunk_closed(dec):
    got = published(dec, dec.decode(body(1.0, hood=OPEN)))
    assert got[HOOD] == (True, VALID) and got[TRUNK] == (False, VALID)


@pytest.mark.parametrize("page", range(4))
def test_window_page_selects_the_vss_path(dec, page):
    # WindowStatus: byte 0 = WindowIndex (multiplexer), byte 1 = position | moving << 7
    data = bytes([page, 0x80 | (10 + page), 0, 0])
    assert data == window_payload(page, 10 + page, moving=1)
    assert published(dec, dec.decode(frame(WINDOW_ID, data, 1.0))) == {
        WINDOWS[page]: (10 + page, VALID)}


def test_window_fully_open_and_closed(dec):
    assert published(dec, dec.decode(window(1.0, 0, 100))) == {WINDOWS[0]: (100, VALID)}
    assert published(dec, dec.decode(window(2.0, 0, 0))) == {WINDOWS[0]: (0, VALID)}


def test_air_temperature_ieee_float_on_29_bit_id(dec):
    data = bytes.fromhex("0000AC4164000000")    # 21.5 as little-endian IEEE-754 single
    assert struct.unpack("<f", data[:4])[0] == 21.5
    assert published(dec, dec.decode(frame(AMBIENT_ID, data, 1.0, extended=True))) == {
        AIR: (21.5, VALID)}
    got = published(dec, dec.decode(ambient(2.0, -7.25)))
    assert got[AIR][1] == VALID and got[AIR][0] == pytest.approx(-7.2, abs=0.051)
    assert published(dec, dec.decode(ambient(3.0, 18.56)))[AIR] == (18.6, VALID)  # decimals: 1


# -- sentinels and out-of-range values become (None, "invalid") --------------------------------


def test_cluster_all_ones_sentinels(dec):
    data = bytes.fromhex("FFFFFFF000000000")  # fuel 255, range 1023, litres 1023, low 0
    got = published(dec, dec.decode(frame(CLUSTER_ID, data, 1.0)))
    assert got == {REL: (None, INVALID), ABS: (None, INVALID), RANGE: (None, INVALID),
                   LOW: (False, VALID)}


def test_range_sentinel_alone(dec):
    got = published(dec, dec.decode(cluster(1.0, 156, 1023, 343)))
    assert got[RANGE] == (None, INVALID)
    assert got[REL] == (62.4, VALID) and got[ABS] == (34.3, VALID)


@pytest.mark.parametrize("fuel,litres,bad", [
    (251, 343, REL),     # 100.4 % > the DBC's 100
    (254, 343, REL),
    (156, 1001, ABS),    # 100.1 l > 100
    (156, 1022, ABS),
])
def test_out_of_dbc_range_raw_value_is_invalid(dec, fuel, litres, bad):
    got = published(dec, dec.decode(cluster(1.0, fuel, 512, litres)))
    assert got[bad] == (None, INVALID)
    assert all(q == VALID for p, (_, q) in got.items() if p != bad)


@pytest.mark.parametrize("state", [ERROR, SNA])
def test_door_error_and_sna_states_are_invalid(dec, state):
    got = published(dec, dec.decode(body(1.0, doors=(state, CLOSED, OPEN, state), trunk=state,
                                         hood=state)))
    assert got[IS_OPEN[0]] == (None, INVALID) and got[IS_OPEN[3]] == (None, INVALID)
    assert got[IS_OPEN[1]] == (False, VALID) and got[IS_OPEN[2]] == (True, VALID)
    assert got[TRUNK] == (None, INVALID) and got[HOOD] == (None, INVALID)


@pytest.mark.parametrize("position", [127, 101, 120])
def test_window_sentinel_and_out_of_range(dec, position):
    assert published(dec, dec.decode(window(1.0, 1, position))) == {WINDOWS[1]: (None, INVALID)}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 80.5, -61.0])
def test_air_temperature_nan_inf_and_out_of_range_are_invalid(dec, value):
    assert published(dec, dec.decode(ambient(1.0, value))) == {AIR: (None, INVALID)}


def test_air_temperature_range_edges_are_valid(dec):
    assert published(dec, dec.decode(ambient(1.0, 80.0))) == {AIR: (80.0, VALID)}
    assert published(dec, dec.decode(ambient(2.0, -60.0))) == {AIR: (-60.0, VALID)}


# -- frames that carry nothing: counted, no updates -------------------------------------------


def counts(dec) -> dict:
    return {k: v for k, v in dec.counters.as_dict().items() if v}


def test_wrong_length_frame(dec):
    assert dec.decode(frame(CLUSTER_ID, bytes(7), 1.0)) == ()
    assert dec.decode(frame(CLUSTER_ID, bytes(12), 1.1, is_fd=True)) == ()
    assert dec.decode(frame(WINDOW_ID, bytes(8), 1.2)) == ()   # WindowStatus is 4 bytes
    assert counts(dec) == {"frames": 3, "wrong_length": 3}


def test_error_frame(dec):
    assert dec.decode(frame(CLUSTER_ID, bytes(8), 1.0, is_error_frame=True)) == ()
    assert counts(dec) == {"frames": 1, "error_frames": 1}


def test_remote_frame(dec):
    assert dec.decode(frame(CLUSTER_ID, b"", 1.0, is_remote_frame=True, dlc=8)) == ()
    assert counts(dec) == {"frames": 1, "remote_frames": 1}


def test_unmapped_ids(dec):
    assert dec.decode(frame(0x0C0, bytes(8), 1.0)) == ()    # EngineData: in the DBC, not mapped
    assert dec.decode(frame(0x123, bytes(8), 1.1)) == ()    # not in the DBC
    assert counts(dec) == {"frames": 2, "unmapped": 2}


def test_identical_payload_twice_is_unchanged(dec):
    first = dec.decode(cluster(1.0, 156, 512, 343))
    assert len(first) == 4
    assert dec.decode(cluster(1.1, 156, 512, 343)) == ()
    assert counts(dec) == {"frames": 2, "decoded": 1, "unchanged": 1}
    # a different payload decodes again, and so does the first one after it
    assert len(dec.decode(cluster(1.2, 156, 512, 343, counter=1))) == 4
    assert len(dec.decode(cluster(1.3, 156, 512, 343))) == 4
    assert counts(dec) == {"frames": 4, "decoded": 3, "unchanged": 1}


def test_unchanged_detection_does_not_alias_a_reused_buffer(dec):
    # a source may hand over a bytearray and then reuse it for the next frame
    buf = bytearray(cluster_payload(156, 512, 343))
    assert len(dec.decode(frame(CLUSTER_ID, buf, 1.0))) == 4
    buf[0] = 150                                  # 60.0 %
    got = published(dec, dec.decode(frame(CLUSTER_ID, buf, 1.1)))
    assert got[REL] == (60.0, VALID)


def test_11_bit_frame_with_the_number_of_a_29_bit_message_is_not_that_message(dec):
    data = ambient_payload(21.5)
    assert dec.decode(frame(AMBIENT_ID, data, 1.0, extended=False)) == ()
    assert dec.decode(frame(CLUSTER_ID, cluster_payload(156, 512, 343), 1.1, extended=True)) == ()
    assert counts(dec) == {"frames": 2, "unmapped": 2}
    assert published(dec, dec.decode(frame(AMBIENT_ID, data, 1.2, extended=True))) == {
        AIR: (21.5, VALID)}


def test_can_filters_list_exactly_the_mapped_ids(dec):
    assert dec.frame_keys == [BODY_ID, WINDOW_ID, CLUSTER_ID, AMBIENT_ID | EXTENDED_KEY]
    assert dec.can_filters() == [
        {"can_id": BODY_ID, "can_mask": 0x7FF, "extended": False},
        {"can_id": WINDOW_ID, "can_mask": 0x7FF, "extended": False},
        {"can_id": CLUSTER_ID, "can_mask": 0x7FF, "extended": False},
        {"can_id": AMBIENT_ID, "can_mask": 0x1FFFFFFF, "extended": True},
    ]


def test_describe_and_stale_timeouts(dec):
    lines = dec.describe()
    assert lines[0].startswith("Cluster (stale after 0.3 s): " + REL)
    assert lines[1].startswith("BodyStatus (stale after 0.3 s): ")
    # a mux page comes once per round of 4 pages: 50 ms x 4 x 3
    assert lines[2] == f"WindowStatus[WindowIndex=0] (stale after 0.6 s): {WINDOWS[0]}"
    assert lines[-1] == f"AmbientConditions (stale after 3 s): {AIR}"
    assert len(lines) == 7


# -- CAN FD -----------------------------------------------------------------------------------

FD_DBC = DBC_HEADER + (
    "BO_ 1536 BigFd: 64 ECU\n"
    ' SG_ First : 0|8@1+ (1,0) [0|255] "" Vector__XXX\n'
    ' SG_ Mid : 256|16@1+ (0.01,0) [0|655.35] "" Vector__XXX\n'
    ' SG_ Last : 504|8@1+ (0.5,0) [0|127.5] "" Vector__XXX\n\n'
    "BO_ 1537 OddFd: 10 ECU\n"
    ' SG_ Tail : 72|8@1+ (1,0) [0|255] "" Vector__XXX\n\n'
    'BA_DEF_ BO_ "VFrameFormat" ENUM "StandardCAN","ExtendedCAN","reserved","J1939PG",'
    '"reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved",'
    '"reserved","reserved","StandardCAN_FD","ExtendedCAN_FD";\n'
    'BA_DEF_DEF_ "VFrameFormat" "StandardCAN";\n'
    'BA_ "VFrameFormat" BO_ 1536 14;\n'
    'BA_ "VFrameFormat" BO_ 1537 14;\n'
)
FD_MAPPING = ("signals:\n"
              "  Vehicle.Cabin.Sunroof.Position:\n    message: BigFd\n    signal: Last\n"
              "  Vehicle.Powertrain.FuelSystem.RelativeLevel:\n    message: BigFd\n"
              "    signal: Mid\n"
              "  Vehicle.Powertrain.FuelSystem.AbsoluteLevel:\n    message: OddFd\n"
              "    signal: Tail\n")


@pytest.fixture
def fd_decoder(tmp_path):
    vdb = load_dbcs([write(tmp_path / "fd.dbc", FD_DBC)])
    assert vdb.find("BigFd").is_fd and vdb.find("BigFd").length == 64
    return Decoder(vdb, load_mapping(write(tmp_path / "fd.yaml", FD_MAPPING)))


def test_can_fd_64_byte_frame_decodes(fd_decoder):
    data = bytearray(64)
    data[32], data[33] = 0x10, 0x27             # Mid (bits 256..271, little-endian) = 10000
    data[63] = 9                                 # Last = 9 x 0.5
    got = published(fd_decoder, fd_decoder.decode(frame(0x600, bytes(data), 1.0, is_fd=True,
                                                         bitrate_switch=True)))
    assert got == {"Vehicle.Cabin.Sunroof.Position": (4.5, VALID),
                   "Vehicle.Powertrain.FuelSystem.RelativeLevel": (100.0, VALID)}


def test_can_fd_message_length_rounds_up_to_the_next_fd_size(fd_decoder):
    # a 10-byte FD message travels in a 12-byte frame; both lengths decode, 8 does not
    data = bytes(9) + bytes([42]) + bytes(2)
    assert published(fd_decoder, fd_decoder.decode(frame(0x601, data, 1.0, is_fd=True))) == {
        "Vehicle.Powertrain.FuelSystem.AbsoluteLevel": (42, VALID)}
    assert len(fd_decoder.decode(frame(0x601, data[:10], 2.0, is_fd=True))) == 1
    assert fd_decoder.decode(frame(0x601, bytes(8), 3.0, is_fd=True)) == ()
    assert fd_decoder.decode(frame(0x600, bytes(8), 4.0)) == ()
    assert fd_decoder.counters.wrong_length == 2


# -- multiplexed stale timeouts -----------------------------------------------------------------

MUX_DBC = DBC_HEADER + (
    "BO_ 512 Paged: 8 ECU\n"
    ' SG_ Page M : 0|8@1+ (1,0) [0|3] "" Vector__XXX\n'
    ' SG_ Alpha m0 : 8|8@1+ (1,0) [0|100] "%" Vector__XXX\n'
    ' SG_ Beta m1 : 8|8@1+ (1,0) [0|100] "%" Vector__XXX\n'
    ' SG_ Gamma m2 : 8|8@1+ (1,0) [0|100] "%" Vector__XXX\n'
    ' SG_ Delta m3 : 8|8@1+ (1,0) [0|100] "%" Vector__XXX\n\n'
    'BA_DEF_ BO_ "GenMsgCycleTime" INT 0 10000;\n'
    'BA_DEF_DEF_ "GenMsgCycleTime" 0;\n'
    'BA_ "GenMsgCycleTime" BO_ 512 100;\n'
)


def test_signal_on_one_page_decodes_only_from_that_page(tmp_path):
    vdb = load_dbcs([write(tmp_path / "mux.dbc", MUX_DBC)])
    mapping = load_mapping(write(tmp_path / "m.yaml",
                                 "signals:\n  Vehicle.Cabin.Sunroof.Position:\n"
                                 "    message: Paged\n    signal: Gamma\n"))
    dec = Decoder(vdb, mapping)
    assert dec.mux_values == [2]                 # the only page of Gamma, without `mux`
    assert dec.decode(frame(0x200, bytes([1, 50, 0, 0, 0, 0, 0, 0]), 1.0)) == []
    assert dec.decode(frame(0x200, bytes([2, 50, 0, 0, 0, 0, 0, 0]), 1.1)) == [(0, 50, VALID)]


def test_page_timeout_does_not_depend_on_whether_mux_was_written(tmp_path):
    vdb = load_dbcs([write(tmp_path / "mux.dbc", MUX_DBC)])
    implicit = Decoder(vdb, load_mapping(write(
        tmp_path / "a.yaml", "signals:\n  Vehicle.Cabin.Sunroof.Position:\n"
                             "    message: Paged\n    signal: Gamma\n")))
    explicit = Decoder(vdb, load_mapping(write(
        tmp_path / "b.yaml", "signals:\n  Vehicle.Cabin.Sunroof.Position:\n"
                             "    message: Paged\n    signal: Gamma\n    mux: 2\n")))
    assert explicit.feed_timeouts == [pytest.approx(1.2)]    # 100 ms x 4 pages x 3
    assert implicit.feed_timeouts == explicit.feed_timeouts


# -- property: any frame is counted exactly once and never raises ------------------------------

_DEMO_IDS = [BODY_ID, WINDOW_ID, CLUSTER_ID, AMBIENT_ID, 0x0C0, 0x0E0, 0x1A0, 0x1B0, 0x230]
_IDS = st.sampled_from(_DEMO_IDS) | st.integers(0, 0x7FF) | st.integers(0, 0x1FFFFFFF) | \
    st.integers(0, 0xFFFFFFFF)
_DATA = st.sampled_from([0, 4, 7, 8, 12, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)) \
    | st.binary(max_size=64)
_FRAME = st.builds(
    lambda ident, data, ext, err, rtr, fd, t: can.Message(
        timestamp=t, arbitration_id=ident, data=data, is_extended_id=ext, is_error_frame=err,
        is_remote_frame=rtr, is_fd=fd, check=False),
    _IDS, _DATA, st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.floats(0, 1e9))


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAME, min_size=1, max_size=40))
def test_decode_never_raises_and_counts_every_frame_once(frames):
    dec = demo_decoder()
    n_paths = len(dec.paths)
    for msg in frames:
        before = dec.counters.as_dict()
        updates = dec.decode(msg)
        after = dec.counters.as_dict()
        moved = [k for k in after if k != "frames" and after[k] != before[k]]
        assert after["frames"] == before["frames"] + 1
        assert len(moved) == 1 and after[moved[0]] == before[moved[0]] + 1, moved
        if updates:
            assert moved in (["decoded"], ["unknown_page"])
        for index, value, quality in updates:
            assert 0 <= index < n_paths and quality in QUALITIES
            assert (value is None) == (quality == INVALID)
            if isinstance(value, float):
                assert math.isfinite(value)
    c = dec.counters
    assert c.frames == len(frames) == (c.decoded + c.unchanged + c.unmapped + c.error_frames
                                       + c.remote_frames + c.wrong_length + c.undecodable
                                       + c.unknown_page)


# -- extended multiplexing (issue 16.1) ---------------------------------------------------------

EXT_MAPPING = ("signals:\n"
               "  Vehicle.Powertrain.FuelSystem.RelativeLevel: {message: Info, signal: FuelPct}\n"
               "  Vehicle.Powertrain.FuelSystem.Range: {message: Info, signal: RangeKm, "
               "scale: 1000}\n"
               "  Vehicle.Test.Counter: {message: Info, signal: Counter}\n")
FUEL_PAGE = bytes([0x00, 42, 0, 0, 0, 0, 0, 7])
RANGE_PAGE = bytes([0x21, 0, 0x2C, 0x01, 0, 0, 0, 7])      # Page 1, SubPage 2, RangeKm 300


def ext_decoder(tmp_path, mapping: str = EXT_MAPPING, dbc: str = EXT_DBC) -> Decoder:
    return Decoder(load_dbcs([write(tmp_path / "ext.dbc", dbc)]),
                   load_mapping(write(tmp_path / "ext.yaml", mapping)))


def test_extended_multiplexing_publishes_each_page_and_keeps_it_fresh(tmp_path):
    """Both pages mapped, frames alternating every 50 ms: FuelPct=42 and RangeKm=300 are
    both published, and neither goes stale while its page keeps arriving."""
    dec = ext_decoder(tmp_path)
    seen: dict = {}
    for n in range(40):
        t = n * 0.05
        seen.update(published(dec, dec.decode(frame(0x500, FUEL_PAGE if n % 2 == 0
                                                    else RANGE_PAGE, t))))
        assert dec.expired(t) == []
    assert seen == {"Vehicle.Powertrain.FuelSystem.RelativeLevel": (42, VALID),
                    "Vehicle.Powertrain.FuelSystem.Range": (300000, VALID),
                    "Vehicle.Test.Counter": (7, VALID)}
    assert dec.counters.decoded == 40
    # The chain is shown, and each page's timeout counts its rounds of pages at every level.
    assert dec.describe() == [
        "Info[Page=0] (stale after 0.3 s): Vehicle.Powertrain.FuelSystem.RelativeLevel",
        "Info[Page=1,SubPage=2] (stale after 0.3 s): Vehicle.Powertrain.FuelSystem.Range",
        "Info (stale after 0.15 s): Vehicle.Test.Counter"]
    # The range page stops: only its signal goes stale.
    for n in range(40, 60):
        dec.decode(frame(0x500, FUEL_PAGE, n * 0.05))
    assert [dec.paths[i] for i in dec.expired(3.0)] == ["Vehicle.Powertrain.FuelSystem.Range"]


def test_extended_multiplexing_needs_every_multiplexer_on_the_chain(tmp_path):
    dec = ext_decoder(tmp_path)
    # Page 1 but SubPage 3: RangeKm's bytes are not RangeKm.
    other_sub = bytes([0x31, 0, 0x2C, 0x01, 0, 0, 0, 7])
    assert published(dec, dec.decode(frame(0x500, other_sub, 1.0))) == {
        "Vehicle.Test.Counter": (7, VALID)}


@pytest.mark.parametrize("page_zero", [True, False])
def test_unknown_page_publishes_the_unmultiplexed_signals_and_is_counted(tmp_path, page_zero):
    """Issue 16.6: a multiplexer value naming no page; whether or not the message has page 0."""
    dbc = EXT_DBC if page_zero else EXT_DBC.replace("FuelPct m0", "FuelPct m3").replace(
        "FuelPct Page 0-0", "FuelPct Page 3-3")
    dec = ext_decoder(tmp_path, dbc=dbc)
    updates = dec.decode(frame(0x500, bytes([0x05, 42, 0, 0, 0, 0, 0, 9]), 1.0))
    assert published(dec, updates) == {"Vehicle.Test.Counter": (9, VALID)}
    assert dec.counters.unknown_page == 1 and dec.counters.decoded == 0
    assert dec.counters.undecodable == 0


def test_unknown_page_is_counted_when_only_unmultiplexed_signals_are_mapped(tmp_path):
    dec = ext_decoder(tmp_path, "signals:\n  Vehicle.Test.Counter: {message: Info, "
                                "signal: Counter}\n")
    assert published(dec, dec.decode(frame(0x500, bytes([0x05, 0, 0, 0, 0, 0, 0, 9]), 1.0))) \
        == {"Vehicle.Test.Counter": (9, VALID)}
    assert dec.counters.unknown_page == 1


# -- a declared length that is no frame size (issue 16.5) ---------------------------------------

def test_ten_byte_message_not_marked_fd_decodes_from_its_12_byte_fd_frame(tmp_path):
    dbc = DBC_HEADER + ("BO_ 1536 Odd: 10 ECU\n"
                        ' SG_ Level : 72|8@1+ (1,0) [0|100] "%" ECU\n')
    dec = Decoder(load_dbcs([write(tmp_path / "odd.dbc", dbc)]), load_mapping(write(
        tmp_path / "m.yaml", "signals:\n  Vehicle.Test.Level: {message: Odd, signal: Level}\n")))
    data = bytes(9) + bytes([42]) + b"\xAA\xAA"          # padding after the message
    assert published(dec, dec.decode(frame(0x600, data, 1.0, is_fd=True))) == {
        "Vehicle.Test.Level": (42, VALID)}
    assert dec.decode(frame(0x600, bytes(8), 2.0)) == ()
    assert dec.counters.decoded == 1 and dec.counters.wrong_length == 1
    assert dec.notes == ["Odd (10 bytes) needs CAN FD (not marked FD in the DBC): it travels "
                         "in 12-byte frames"]


# -- mapped signals that can never decode (issue 13.9) -------------------------------------------

@pytest.mark.parametrize("layout, needle", [
    (' SG_ A : 0|8@1+ (1,0) [0|0] "" ECU\n SG_ B : 4|8@1+ (1,0) [0|0] "" ECU\n',
     "message Bad: signals A and B overlap: they can never both decode"),
    (' SG_ A : 0|8@1+ (1,0) [0|0] "" ECU\n SG_ B : 60|8@1+ (1,0) [0|0] "" ECU\n',
     "message Bad: signal B (60|8) does not fit in its 8 bytes: it can never decode"),
    (' SG_ A : 0|8@1+ (1,0) [0|0] "" ECU\n SG_ B : 7|8@0+ (1,0) [0|0] "" ECU\n',
     "message Bad: signals A and B overlap"),                           # Motorola byte 0
    (' SG_ A : 0|8@1+ (1,0) [0|0] "" ECU\n SG_ B : 59|8@0+ (1,0) [0|0] "" ECU\n',
     "message Bad: signal B (59|8) does not fit in its 8 bytes"),        # Motorola past the end
])
def test_mapped_signals_that_can_never_decode_fail_at_load(tmp_path, layout, needle):
    dbc = write(tmp_path / "bad.dbc", DBC_HEADER + "BO_ 256 Bad: 8 ECU\n" + layout)
    vdb = load_dbcs([dbc])
    mapping = load_mapping(write(tmp_path / "m.yaml", "signals:\n"
                                 "  Vehicle.Test.A: {message: Bad, signal: A}\n"
                                 "  Vehicle.Test.B: {message: Bad, signal: B}\n"))
    with pytest.raises(ConfigError) as info:
        Decoder(vdb, mapping)
    assert str(info.value) == f"{dbc}: {needle}" or str(info.value).startswith(f"{dbc}: {needle}")
    # Mapped alone, each decodes (the other is not needed).
    alone = load_mapping(write(tmp_path / "a.yaml", "signals:\n"
                               "  Vehicle.Test.A: {message: Bad, signal: A}\n"))
    assert Decoder(vdb, alone).decode(frame(0x100, bytes([5]) + bytes(7), 1.0)) == [(0, 5, VALID)]


def test_signals_on_different_pages_may_share_bits(tmp_path):
    dec = Decoder(load_dbcs([write(tmp_path / "mux.dbc", MUX_DBC)]), load_mapping(write(
        tmp_path / "m.yaml", "signals:\n  Vehicle.Test.A: {message: Paged, signal: Alpha}\n"
                             "  Vehicle.Test.B: {message: Paged, signal: Beta}\n")))
    assert dec.decode(frame(0x200, bytes([1, 50, 0, 0, 0, 0, 0, 0]), 1.0)) == [(1, 50, VALID)]
