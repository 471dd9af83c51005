"""agent.signals.mapping (YAML -> Mapping) and binding a mapping to the DBC (agent.decode.Decoder)."""

from __future__ import annotations

import pytest

from agent.can.dbc import load_dbcs
from agent.signals.decoder import Decoder
from agent.errors import ConfigError
from agent.signals.mapping import load_mapping
from agent.signals.model import KNOWN_VSS, Mapping, SignalSpec
from coredata import (ALL_DEMO_PATHS, CLUSTER_ID, DEMO_DBC, DEMO_MAPPING, WINDOWS, cluster,
                      one_line, write)


@pytest.fixture(scope="module")
def demo_db():
    return load_dbcs([DEMO_DBC])


def mapping_file(tmp_path, body: str, name: str = "m.yaml"):
    return write(tmp_path / name, "signals:\n" + body)


def bind_error(tmp_path, demo_db, body: str) -> str:
    """Load the mapping fine, fail binding it to the demo DBC; the message is one line."""
    path = mapping_file(tmp_path, body)
    mapping = load_mapping(path)
    with pytest.raises(ConfigError) as info:
        Decoder(demo_db, mapping)
    message = str(info.value)
    assert one_line(message) and message.startswith(f"{path}: signals."), message
    return message


def load_error(tmp_path, body: str, top: str = "signals:\n") -> str:
    path = write(tmp_path / "m.yaml", top + body)
    with pytest.raises(ConfigError) as info:
        load_mapping(path)
    message = str(info.value)
    assert one_line(message) and message.startswith(f"{path}:"), message
    return message


# -- the demo mapping --------------------------------------------------------------------------


def test_demo_mapping_loads_every_signal_in_file_order():
    mapping = load_mapping(DEMO_MAPPING)
    assert isinstance(mapping, Mapping)
    assert [s.path for s in mapping.signals] == [
        "Vehicle.Powertrain.FuelSystem.RelativeLevel",
        "Vehicle.Powertrain.FuelSystem.AbsoluteLevel",
        "Vehicle.Powertrain.FuelSystem.Range",
        "Vehicle.Powertrain.FuelSystem.IsFuelLevelLow",
        "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen",
        "Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen",
        "Vehicle.Cabin.Door.Row2.DriverSide.IsOpen",
        "Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen",
        "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked",
        "Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked",
        "Vehicle.Cabin.Door.Row2.DriverSide.IsLocked",
        "Vehicle.Cabin.Door.Row2.PassengerSide.IsLocked",
        *WINDOWS,
        "Vehicle.Body.Trunk.Rear.IsOpen",
        "Vehicle.Body.Hood.IsOpen",
        "Vehicle.Exterior.AirTemperature",
    ]
    assert sorted(s.path for s in mapping.signals) == sorted(ALL_DEMO_PATHS)
    assert mapping.stale_factor == 3.0 and mapping.default_timeout_ms is None
    by_path = {s.path: s for s in mapping.signals}
    assert by_path["Vehicle.Powertrain.FuelSystem.Range"] == SignalSpec(
        path="Vehicle.Powertrain.FuelSystem.Range", message="Cluster", signal="RangeKm",
        scale=1000.0, offset=0.0, invalid=(1023,))
    assert by_path["Vehicle.Powertrain.FuelSystem.IsFuelLevelLow"].message == 0x3D0
    assert by_path["Vehicle.Powertrain.FuelSystem.IsFuelLevelLow"].values == ((0, False),
                                                                               (1, True))
    assert by_path["Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"].values == (("OPEN", True),
                                                                           ("CLOSED", False))
    assert [by_path[w].mux for w in WINDOWS] == ["FrontLeft", "FrontRight", "RearLeft",
                                                 "RearRight"]
    assert by_path["Vehicle.Exterior.AirTemperature"].decimals == 1


def test_every_known_boolean_vss_path_in_the_demo_has_boolean_values():
    for spec in load_mapping(DEMO_MAPPING).signals:
        if KNOWN_VSS.get(spec.path) == "bool":
            assert spec.values and all(type(v) is bool for _, v in spec.values), spec.path


# -- mapping file errors (no DBC needed) ------------------------------------------------------

SPEC = "    message: Cluster\n    signal: RangeKm\n"


@pytest.mark.parametrize("path", ["Vehicle..Range", "Car.Fuel.Range", "Vehicle", "vehicle.Speed",
                                  "Vehicle.Fuel Level", "Vehicle.Body.Hood.IsOpen.",
                                  "Vehicle.Body.-Hood"])
def test_bad_vss_path(tmp_path, path):
    message = load_error(tmp_path, f"  '{path}':\n" + SPEC)
    assert f"signals.{path}: not a VSS path" in message


def test_boolean_vss_path_without_values(tmp_path):
    message = load_error(tmp_path, "  Vehicle.Cabin.Door.Row1.DriverSide.IsOpen:\n"
                                   "    message: BodyStatus\n    signal: DoorFL\n")
    assert "signals.Vehicle.Cabin.Door.Row1.DriverSide.IsOpen.values: missing" in message


def test_boolean_vss_path_with_non_boolean_published_value(tmp_path):
    message = load_error(tmp_path, "  Vehicle.Body.Hood.IsOpen:\n    message: BodyStatus\n"
                                   "    signal: Hood\n    values: {OPEN: 1, CLOSED: 0}\n")
    assert "signals.Vehicle.Body.Hood.IsOpen.values.OPEN: expected true or false" in message


@pytest.mark.parametrize("extra,key,words", [
    ("    scael: 1000\n", "scael", "unknown key"),
    ("    scale: big\n", "scale", "expected a number"),
    ("    invalid: [1023, x]\n", "invalid[1]", "expected a raw number"),
    ("    invalid: [true]\n", "invalid[0]", "expected a raw number"),
    ("    values: [1, 2]\n", "values", "expected a mapping"),
    ("    values: {}\n", "values", "expected a mapping"),
    ("    values: {1: [a]}\n", "values.1", "expected a boolean, number or string"),
    ("    values: {1: .nan}\n", "values.1", "expected a boolean, number or string"),
    ("    timeout_ms: 0\n", "timeout_ms", "expected an integer"),
    ("    decimals: 13\n", "decimals", "expected an integer"),
    ("    mux: [1]\n", "mux", "expected"),
])
def test_bad_signal_keys(tmp_path, extra, key, words):
    message = load_error(tmp_path, "  Vehicle.Powertrain.FuelSystem.Range:\n" + SPEC + extra)
    assert f"signals.Vehicle.Powertrain.FuelSystem.Range.{key}: " in message and words in message


def test_frame_id_outside_29_bits(tmp_path):
    message = load_error(tmp_path, "  Vehicle.Powertrain.FuelSystem.Range:\n"
                                   "    message: 0x20000000\n    signal: RangeKm\n")
    assert "Range.message: frame id 0x20000000 is outside" in message


def test_missing_signal_key(tmp_path):
    message = load_error(tmp_path, "  Vehicle.Powertrain.FuelSystem.Range:\n    message: Cluster\n")
    assert "signals.Vehicle.Powertrain.FuelSystem.Range.signal: missing" in message


@pytest.mark.parametrize("text,words", [
    ("signals: {}\n", "signals: no signals mapped"),
    ("signal:\n  Vehicle.X: {message: A, signal: B}\n", "signal: unknown key"),
    ("stale_factor: 0.5\nsignals:\n  Vehicle.X: {message: A, signal: B}\n", "stale_factor"),
    ("- Vehicle.X\n", "top level: expected a mapping"),
    ("signals:\n  Vehicle.X: 3\n", "signals.Vehicle.X: expected a mapping, got int 3"),
])
def test_bad_mapping_top_level(tmp_path, text, words):
    assert words in load_error(tmp_path, text, top="")


def test_duplicate_vss_path_is_rejected_with_location(tmp_path):
    message = load_error(tmp_path, "  Vehicle.Body.Hood.IsOpen: {message: BodyStatus, signal: "
                                   "Hood, values: {OPEN: true}}\n"
                                   "  Vehicle.Body.Hood.IsOpen: {message: BodyStatus, signal: "
                                   "Trunk, values: {OPEN: true}}\n")
    assert ":3:3:" in message and "duplicate key 'Vehicle.Body.Hood.IsOpen'" in message


def test_unknown_but_well_formed_vss_path_is_accepted(tmp_path):
    path = mapping_file(tmp_path, "  Vehicle.Powertrain.CombustionEngine.Speed:\n"
                                  "    message: EngineData\n    signal: EngineSpeed\n")
    spec = load_mapping(path).signals[0]
    assert (spec.path, spec.message, spec.signal) == (
        "Vehicle.Powertrain.CombustionEngine.Speed", "EngineData", "EngineSpeed")


# -- binding to the DBC (Decoder constructor) -------------------------------------------------


def test_values_naming_a_choice_not_in_the_value_table(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db,
                         "  Vehicle.Body.Hood.IsOpen:\n    message: BodyStatus\n    signal: Hood\n"
                         "    values: {OPN: true, CLOSED: false}\n")
    assert "signals.Vehicle.Body.Hood.IsOpen.values.OPN: not a value of Hood" in message
    assert "CLOSED, OPEN, ERROR, SNA" in message


def test_yaml_11_boolean_word_as_value_name_is_looked_up_as_a_string(tmp_path, demo_db):
    # ON is not a value of Hood: the error must name the string "ON", not True
    message = bind_error(tmp_path, demo_db,
                         "  Vehicle.Body.Hood.IsOpen:\n    message: BodyStatus\n    signal: Hood\n"
                         "    values: {ON: true}\n")
    assert "values.ON: not a value of Hood" in message


def test_values_on_a_signal_without_value_table(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db,
                         "  Vehicle.Body.Hood.IsOpen:\n    message: BrakeStatus\n"
                         "    signal: BrakePedalPressed\n    values: {PRESSED: true}\n")
    assert "values.PRESSED: not a value of BrakePedalPressed (its value table: none)" in message


def test_unknown_message_name(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db, "  Vehicle.Powertrain.FuelSystem.Range:\n"
                                            "    message: Clustre\n    signal: RangeKm\n")
    assert "signals.Vehicle.Powertrain.FuelSystem.Range.message: no message Clustre in" in message
    assert "demo_vehicle.dbc" in message


def test_unknown_message_id(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db, "  Vehicle.Powertrain.FuelSystem.Range:\n"
                                            "    message: 0x3D1\n    signal: RangeKm\n")
    assert "Range.message: no message 0x3d1 in" in message


def test_unknown_signal_lists_the_signals_of_the_message(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db, "  Vehicle.Powertrain.FuelSystem.Range:\n"
                                            "    message: Cluster\n    signal: RangeMiles\n")
    assert "Range.signal: message Cluster has no signal 'RangeMiles'" in message
    for name in ("FuelLevelPct", "RangeKm", "FuelLitres", "LowFuelWarning"):
        assert name in message


def test_mux_on_a_non_multiplexed_signal(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db, "  Vehicle.Powertrain.FuelSystem.Range:\n"
                                            "    message: Cluster\n    signal: RangeKm\n"
                                            "    mux: 1\n")
    assert "Range.mux: signal RangeKm of Cluster is not multiplexed" in message


def test_mux_name_not_in_the_multiplexer_table(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db, "  Vehicle.Cabin.Sunroof.Position:\n"
                                            "    message: WindowStatus\n"
                                            "    signal: WindowPosition\n    mux: Sunroof\n")
    assert "signals.Vehicle.Cabin.Sunroof.Position.mux: 'Sunroof' is not a value of WindowIndex" \
        in message


def test_mux_raw_value_not_a_page_of_the_signal(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db, "  Vehicle.Cabin.Sunroof.Position:\n"
                                            "    message: WindowStatus\n"
                                            "    signal: WindowPosition\n    mux: 7\n")
    assert "Position.mux: signal WindowPosition is not on page 7 of WindowStatus" in message
    assert "pages: 0, 1, 2, 3" in message


def test_mux_missing_for_a_signal_on_several_pages(tmp_path, demo_db):
    message = bind_error(tmp_path, demo_db, "  Vehicle.Cabin.Sunroof.Position:\n"
                                            "    message: WindowStatus\n"
                                            "    signal: WindowPosition\n")
    assert "Position.mux: signal WindowPosition is on several pages" in message


def test_mux_by_raw_value_and_by_name_select_the_same_page(tmp_path, demo_db):
    by_raw = Decoder(demo_db, load_mapping(mapping_file(
        tmp_path, "  Vehicle.Cabin.Sunroof.Position:\n    message: WindowStatus\n"
                  "    signal: WindowPosition\n    mux: 2\n", "raw.yaml")))
    by_name = Decoder(demo_db, load_mapping(mapping_file(
        tmp_path, "  Vehicle.Cabin.Sunroof.Position:\n    message: WindowStatus\n"
                  "    signal: WindowPosition\n    mux: RearLeft\n", "name.yaml")))
    assert by_raw.mux_values == by_name.mux_values == [2]


def test_message_given_as_frame_id_int_works(tmp_path, demo_db):
    decoder = Decoder(demo_db, load_mapping(mapping_file(
        tmp_path, "  Vehicle.Powertrain.FuelSystem.Range:\n    message: 0x3D0\n"
                  "    signal: RangeKm\n    scale: 1000\n"
                  "  Vehicle.Exterior.AirTemperature:\n    message: 0x18FF50E5\n"
                  "    signal: AmbientTemp\n")))
    assert decoder.frame_keys == [CLUSTER_ID, 0x18FF50E5 | 0x80000000]
    updates = decoder.decode(cluster(1.0, 156, 512, 343))
    assert updates == [(0, 512000, "valid")]


def test_binding_errors_name_the_mapping_file_not_the_config(tmp_path, demo_db):
    # the mapping file lives elsewhere than the DBC: the error names the mapping file
    message = bind_error(tmp_path, demo_db, "  Vehicle.Body.Hood.IsOpen:\n    message: Nope\n"
                                            "    signal: Hood\n    values: {OPEN: true}\n")
    assert str(tmp_path / "m.yaml") in message
