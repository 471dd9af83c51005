"""agent.signals.vehicle.compile_decoder: the daemon's decoder, built in a start-up child."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.errors import ConfigError
from agent.signals.vehicle import compile_decoder, load_vehicle
from agent.signals.model import VALID
from coredata import (CLUSTER_PATHS, DEMO_CONFIG, RANGE, REL, WINDOW_ID, body, cluster,
                      demo_decoder, frame, published, window_payload)


def test_the_compiled_decoder_decodes_as_the_one_built_here():
    config, compiled = compile_decoder(DEMO_CONFIG)
    assert config.vehicle_id == load_vehicle(DEMO_CONFIG).config.vehicle_id
    here = demo_decoder()
    assert compiled.paths == here.paths
    frames = [cluster(0.0, 80, 512, 40), body(0.1, doors=(1, 0, 0, 0)),
              frame(WINDOW_ID, window_payload(2, 55), 0.2)]
    for msg in frames:
        assert published(compiled, compiled.decode(msg)) == published(here, here.decode(msg))
    got = published(compiled, compiled.decode(cluster(1.0, 200, 256, 20)))
    assert got[REL] == (80.0, VALID) and got[RANGE] == (256_000, VALID)
    assert set(CLUSTER_PATHS) <= set(got)
    assert compiled.counters.decoded == 4


def test_the_daemon_process_never_imports_cantools():
    code = ("import json, sys\n"
            "from agent.signals.vehicle import compile_decoder\n"
            f"config, decoder = compile_decoder({str(DEMO_CONFIG)!r})\n"
            "print(json.dumps([len(decoder.paths), sorted(m for m in sys.modules\n"
            "      if m.split('.')[0] in ('cantools', 'textparser', 'bitstruct'))]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=DEMO_CONFIG.parent.parent)
    paths, loaded = json.loads(out.stdout)
    assert paths == len(demo_decoder().paths) and loaded == []


def _config(tmp_path, mapping_text: str | None = None, dbc_text: str | None = None):
    root = DEMO_CONFIG.parent.parent
    config = tmp_path / "vehicle.yaml"
    dbc = root / "dbc" / "demo_vehicle.dbc"
    mapping = root / "config" / "mapping" / "demo_vehicle.yaml"
    if dbc_text is not None:
        dbc = tmp_path / "broken.dbc"
        dbc.write_text(dbc_text)
    if mapping_text is not None:
        mapping = tmp_path / "mapping.yaml"
        mapping.write_text(mapping_text)
    config.write_text(f"vehicle_id: VIN1\ndbc: [{dbc}]\nmapping: {mapping}\n")
    return config


@pytest.mark.parametrize("what", ["mapping", "dbc"])
def test_errors_of_the_child_are_the_same_one_line_config_errors(tmp_path, what):
    if what == "mapping":
        config = _config(tmp_path, mapping_text=(
            "signals:\n  Vehicle.Powertrain.FuelSystem.Range:\n"
            "    message: Cluster\n    signal: NoSuchSignal\n"))
    else:
        config = _config(tmp_path, dbc_text='VERSION ""\n\nBO_ 100 M: 8 X\n SG_ S : 0|8@1+ (1,0 [0|0] "" X\n')
    with pytest.raises(ConfigError) as here:
        load_vehicle(config)
    with pytest.raises(ConfigError) as compiled:
        compile_decoder(config)
    assert str(compiled.value) == str(here.value)
    assert "\n" not in str(compiled.value)
    assert (("NoSuchSignal" in str(compiled.value)) if what == "mapping"
            else ("broken.dbc" in str(compiled.value)))
