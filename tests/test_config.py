"""agent.config / agent.schema: the demo config's values, and one-line errors for broken configs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load_config
from agent.errors import ConfigError, UserError
from agent.signals.mapping import load_mapping
from agent.schema import load_yaml
from coredata import DEMO_CONFIG, REPO, one_line, write

BASE = "vehicle_id: VIN1\ndbc: [vehicle.dbc]\nmapping: mapping.yaml\n"


def config_error(path: Path) -> str:
    """Load ``path`` expecting a ConfigError; return its message after the common checks."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert one_line(message), message
    assert message.startswith(f"{path}:"), message
    return message


# -- the demo config -------------------------------------------------------------------------


def test_demo_config_loads_documented_values():
    cfg = load_config(DEMO_CONFIG)
    folder = DEMO_CONFIG.parent
    assert cfg.file == DEMO_CONFIG
    assert cfg.vehicle_id == "VIN1"
    # relative paths resolve against the config's folder
    assert cfg.dbc == (folder / "../dbc/demo_vehicle.dbc",)
    assert cfg.dbc[0].resolve() == (REPO / "dbc" / "demo_vehicle.dbc").resolve()
    assert cfg.dbc[0].is_file()
    assert cfg.mapping == folder / "mapping" / "demo_vehicle.yaml"
    assert cfg.mapping.is_file()

    assert cfg.can is not None
    assert (cfg.can.interface, cfg.can.channel, cfg.can.fd) == ("socketcan", "vcan0", False)
    assert cfg.can.capture is None and cfg.can.bitrate is None and cfg.can.realtime is True

    assert cfg.signing.key == folder / "pki" / "VIN1.signing.key"
    assert cfg.mqtt.host == "127.0.0.1"
    assert cfg.mqtt.port == 8883
    assert cfg.mqtt.ca == folder / "pki" / "ca.crt"
    assert cfg.mqtt.cert == folder / "pki" / "VIN1.crt"
    assert cfg.mqtt.key == folder / "pki" / "VIN1.key"
    assert cfg.mqtt.topic_prefix == "vehicles"
    assert cfg.mqtt.keepalive_s == 30
    assert cfg.mqtt.tls_version == "1.2"
    assert cfg.store.path == folder / "outbox.db"
    assert cfg.store.max_bytes == 64 * 1024 * 1024
    assert cfg.logging.level == "info"


def test_config_is_frozen():
    cfg = load_config(DEMO_CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vehicle_id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.can.channel = "can1"  # type: ignore[misc]


def test_relative_paths_resolve_against_config_folder_not_cwd(tmp_path, monkeypatch):
    cfg_file = write(tmp_path / "etc" / "car.yaml",
                     "vehicle_id: V-1\ndbc: dbc/a.dbc\nmapping: ../maps/m.yaml\n"
                     "can: {capture: drives/d.log, format: candump, realtime: false}\n"
                     f"store: {{path: {tmp_path / 'abs.db'}}}\n")
    monkeypatch.chdir(REPO)
    cfg = load_config(cfg_file)
    assert cfg.dbc == (tmp_path / "etc" / "dbc" / "a.dbc",)       # one string -> one-tuple
    assert cfg.mapping == tmp_path / "etc" / "../maps/m.yaml"
    assert cfg.can.capture == tmp_path / "etc" / "drives" / "d.log"
    assert cfg.can.capture_format == "candump" and cfg.can.realtime is False
    assert cfg.can.interface is None
    assert cfg.store.path == tmp_path / "abs.db"                     # absolute stays
    assert cfg.mqtt is None and cfg.signing is None


def test_require_names_the_missing_section(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", BASE))
    cfg.require("dbc")
    with pytest.raises(ConfigError, match=r"c\.yaml: mqtt: missing"):
        cfg.require("mqtt")


# -- broken configs: one line naming the file and the key path --------------------------------

BROKEN = [
    ("missing_vehicle_id", "dbc: [a.dbc]\nmapping: m.yaml\n", ["vehicle_id", "missing"]),
    ("slash_in_vehicle_id", BASE.replace("VIN1", "VIN/1"), ["vehicle_id", "'VIN/1'"]),
    ("plus_in_vehicle_id", BASE.replace("VIN1", "'VIN+1'"), ["vehicle_id", "'VIN+1'"]),
    ("hash_in_vehicle_id", BASE.replace("VIN1", "'VIN#1'"), ["vehicle_id", "'VIN#1'"]),
    ("space_in_vehicle_id", BASE.replace("VIN1", "'VIN 1'"), ["vehicle_id"]),
    ("typo_intrface", BASE + "can:\n  intrface: socketcan\n", ["can.intrface", "unknown key",
                                                              "interface"]),
    ("unknown_top_key", BASE + "mqqt: {host: x}\n", ["mqqt", "unknown key"]),
    ("port_not_int", BASE + "mqtt: {host: h, port: abc, ca: a, cert: b, key: c}\n",
     ["mqtt.port", "expected an integer", "'abc'"]),
    ("port_out_of_range", BASE + "mqtt: {host: h, port: 70000, ca: a, cert: b, key: c}\n",
     ["mqtt.port", "70000"]),
    ("fd_yes", BASE + "can: {interface: socketcan, fd: yes}\n", ["can.fd", "true or false",
                                                                 "'yes'"]),
    ("capture_and_interface", BASE + "can: {interface: socketcan, capture: d.log}\n",
     ["can.capture", "not both"]),
    ("capture_and_channel", BASE + "can: {channel: vcan0, capture: d.log}\n",
     ["can.capture", "not both"]),
    ("can_without_source", BASE + "can: {fd: true}\n", ["can.interface", "missing"]),
    ("bad_capture_format", BASE + "can: {capture: d.pcap, format: pcap}\n",
     ["can.format", "'pcap'"]),
    ("can_is_a_list", BASE + "can: [socketcan]\n", ["can", "expected a mapping", "a list"]),
    ("dbc_empty_list", "vehicle_id: V\ndbc: []\nmapping: m.yaml\n", ["dbc", "non-empty"]),
    ("dbc_missing", "vehicle_id: V\nmapping: m.yaml\n", ["dbc"]),
    ("dbc_entry_not_a_path", "vehicle_id: V\ndbc: [a.dbc, {x: 1}]\nmapping: m.yaml\n",
     ["dbc.1"]),
    ("mapping_missing", "vehicle_id: V\ndbc: a.dbc\n", ["mapping", "missing"]),
    ("file_is_a_list", "- vehicle_id\n- VIN1\n", ["top level", "expected a mapping", "a list"]),
    ("empty_file", "", ["top level", "expected a mapping", "nothing"]),
    ("only_a_comment", "# nothing here\n", ["top level", "nothing"]),
    ("topic_prefix_wildcard", BASE + "mqtt: {host: h, ca: a, cert: b, key: c, "
                                     "topic_prefix: 'cars/+'}\n", ["mqtt.topic_prefix"]),
    ("log_level", BASE + "logging: {level: loud}\n", ["logging.level", "'loud'"]),
    ("nul_in_path", BASE + 'store: {path: "a\\0b"}\n', ["store.path", "NUL"]),
    ("mqtt_missing_host", BASE + "mqtt: {ca: a, cert: b, key: c}\n", ["mqtt.host", "missing"]),
    ("bool_as_integer", BASE + "mqtt: {host: h, ca: a, cert: b, key: c, keepalive_s: true}\n",
     ["mqtt.keepalive_s", "boolean true"]),
    ("nan_number", BASE + "mqtt: {host: h, ca: a, cert: b, key: c, reconnect_min_s: .nan}\n",
     ["mqtt.reconnect_min_s", "finite"]),
]


@pytest.mark.parametrize("name,text,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_is_one_line_naming_file_and_key(tmp_path, name, text, expected):
    message = config_error(write(tmp_path / f"{name}.yaml", text))
    for part in expected:
        assert part in message, message
    assert "Traceback" not in message


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "can: {interface: [socketcan}\n")
    message = config_error(path)
    assert message.startswith(f"{path}:4:28: YAML syntax error"), message


def test_unclosed_bracket_at_end_of_file_points_past_the_last_line(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "can:\n  interface: socketcan\n  channel: [vcan0\n")
    message = config_error(path)
    assert re.match(rf"{re.escape(str(path))}:7:1: YAML syntax error: .*'<stream end>'", message)


def test_tab_indentation_is_a_syntax_error_with_location(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "can:\n\tinterface: x\n")
    assert config_error(path).startswith(f"{path}:5:1: YAML syntax error")


def test_duplicate_key_is_rejected_with_location(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "vehicle_id: VIN2\n")
    message = config_error(path)
    assert message.startswith(f"{path}:4:1:"), message
    assert "duplicate key 'vehicle_id'" in message


def test_duplicate_nested_key_is_rejected(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "can:\n  interface: socketcan\n  interface: x\n")
    message = config_error(path)
    assert message.startswith(f"{path}:6:3:") and "duplicate key 'interface'" in message


def test_non_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"vehicle_id: V\xe9hicule\n")
    message = config_error(path)
    assert "not UTF-8" in message and "byte 13" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert config_error(path) == f"{path}: config file not found"


def test_directory_instead_of_file(tmp_path):
    assert "is a directory" in config_error(tmp_path)


def test_huge_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(BASE.encode() + b"#" * (5 * 1024 * 1024))
    assert "more than" in config_error(path)


def test_deeply_nested_yaml_is_a_config_error_not_a_crash(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "logging: " + "[" * 5000 + "]" * 5000 + "\n")
    config_error(path)


def test_recursive_alias_is_a_config_error(tmp_path):
    # a self-referencing alias must not hang or crash the loader
    path = write(tmp_path / "c.yaml", BASE + "can: &a {interface: x, channel: *a}\n")
    config_error(path)


# -- YAML 1.2 booleans: ON / yes / off stay strings -------------------------------------------


def test_yaml_11_booleans_stay_strings_in_config(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml",
                            "vehicle_id: ON\ndbc: [yes]\nmapping: off\n"
                            "can: {interface: socketcan, channel: no, fd: true}\n"))
    assert cfg.vehicle_id == "ON"
    assert cfg.dbc == (tmp_path / "yes",)
    assert cfg.mapping == tmp_path / "off"
    assert cfg.can.channel == "no"
    assert cfg.can.fd is True


def test_yaml_11_booleans_stay_strings_in_mapping_values(tmp_path):
    path = write(tmp_path / "m.yaml",
                 "signals:\n"
                 "  Vehicle.Body.Hood.IsOpen:\n"
                 "    message: BodyStatus\n"
                 "    signal: Hood\n"
                 "    values: {ON: true, OFF: false, yes: true, No: false, 2: false}\n")
    spec = load_mapping(path).signals[0]
    assert spec.values == (("ON", True), ("OFF", False), ("yes", True), ("No", False), (2, False))
    assert all(type(published) is bool for _, published in spec.values)


def test_true_and_false_are_still_booleans(tmp_path):
    path = write(tmp_path / "x.yaml", "a: true\nb: False\nc: TRUE\nd: yes\ne: on\nf: n\n")
    assert load_yaml(path, "test") == {"a": True, "b": False, "c": True, "d": "yes", "e": "on",
                                       "f": "n"}


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


# -- known bugs --------------------------------------------------------------------------------


def test_unknown_key_with_line_break_still_gives_one_line(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", BASE + 'can:\n  "in\\nterface": x\n'))
    assert "can." in message


@pytest.mark.parametrize("deadband", ["{Vehicle.Powertrain.FuelSystem.Range: null}",
                                      "{1: 0.5}"])
def test_policy_deadband_bad_entry_is_config_error(tmp_path, deadband):
    message = config_error(write(tmp_path / "c.yaml", BASE + f"policy:\n  deadband: {deadband}\n"))
    assert "policy.deadband" in message


# -- property: anything YAML can say gives a config or a ConfigError --------------------------

_KEYS = st.sampled_from(["vehicle_id", "can", "dbc", "mapping", "signing", "mqtt", "store",
                         "logging", "interface", "channel", "fd", "bitrate", "capture", "format",
                         "realtime", "key", "host", "port", "ca", "cert", "topic_prefix",
                         "keepalive_s", "tls_version", "reconnect_min_s", "path", "max_bytes",
                         "level"]) | st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=5)
_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
            | st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "P", "Zs"]),
                      max_size=8))
_VALUES = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=3)
                       | st.dictionaries(_KEYS, c, max_size=4), max_leaves=10)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(extra=st.dictionaries(_KEYS, _VALUES, max_size=5), keep_base=st.booleans())
def test_any_yaml_document_loads_or_raises_one_line_config_error(tmp_path, extra, keep_base):
    doc = {"vehicle_id": "V1", "dbc": "a.dbc", "mapping": "m.yaml", **extra} if keep_base else extra
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert one_line(str(exc)) and str(exc).startswith(str(path)), str(exc)
    else:
        assert cfg.vehicle_id and cfg.dbc and cfg.mapping


# -- one vehicle-id rule (issue 11.3) ----------------------------------------------------------


@pytest.mark.parametrize("vid", ["VIN.1", "VIN/1", "-VIN", "x" * 65, "VIN 1"])
def test_one_vehicle_id_rule_with_one_message_everywhere(tmp_path, vid):
    """Config, `pki init --vehicle`, `pki revoke` and the JWKS `vid` refuse the same ids with
    the same words; the rule itself is stated once (agent.config.VEHICLE_ID_RULE)."""
    from agent.config import VEHICLE_ID_RULE
    from agent.dev.pki import init_pki, revoke
    from agent.uplink.signing import Signer, Verifier
    from cryptography.hazmat.primitives.asymmetric import ed25519

    words = f"{vid!r} is not a valid vehicle id ({VEHICLE_ID_RULE})"
    assert words in config_error(write(tmp_path / "c.yaml", f"vehicle_id: '{vid}'\n"
                                       "dbc: [a.dbc]\nmapping: m.yaml\n"))
    for make in (lambda: init_pki(tmp_path / "p", [vid]), lambda: revoke(tmp_path / "p", vid)):
        with pytest.raises(UserError) as info:
            make()
        assert str(info.value) == f"--vehicle: {words}"
    jwk = {**Signer(ed25519.Ed25519PrivateKey.generate()).public_jwk, "vid": vid}
    with pytest.raises(ConfigError) as info:
        Verifier({"keys": [jwk]}, source="jwks.json")
    assert str(info.value).endswith(f": 'vid': {words}")


def test_vehicle_ids_valid_everywhere(tmp_path):
    from agent.dev.pki import init_pki

    for vid in ("VIN1", "WVWZZZ1JZXW000001", "car_7-b", "x" * 64):
        assert load_config(write(tmp_path / "c.yaml", f"vehicle_id: {vid}\n"
                                 "dbc: [a.dbc]\nmapping: m.yaml\n")).vehicle_id == vid
    assert init_pki(tmp_path / "p", ["car_7-b"])["vehicles_added"] == ["car_7-b"]


@pytest.mark.parametrize("text, expected", [("1e3", 1000.0), ("2.5E-1", 0.25), ("+4e+2", 400.0),
                                            ("1000", 1000.0), ("1.5", 1.5)])
def test_numbers_with_an_exponent_are_numbers(tmp_path, text, expected):
    """Issue 13.12: YAML 1.1 reads `1e3` as a string; a mapping's `scale: 1e3` is 1000."""
    mapping = load_mapping(write(tmp_path / "m.yaml", "signals:\n  Vehicle.Test.X:\n"
                                 f"    message: M\n    signal: S\n    scale: {text}\n"))
    assert mapping.signals[0].scale == expected
    cfg = load_config(write(tmp_path / "c.yaml", BASE + f"policy: {{min_interval_s: {text}}}\n"))
    assert cfg.policy.min_interval_s == expected


def test_exponent_text_is_still_text_where_text_is_expected(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", BASE.replace("VIN1", "1e3"))).vehicle_id == "1e3"
    path = write(tmp_path / "c2.yaml", BASE + "mqtt: {host: h, port: 8e3, ca: a, cert: b, key: c}\n")
    assert "mqtt.port: expected an integer, got str '8e3'" in config_error(path)
