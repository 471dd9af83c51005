"""A vehicle definition: config + DBC files + mapping, loaded and cross-checked together.

:func:`compile_decoder` is the daemon's way in: it loads the DBC files in a short-lived child
process and takes back only the built decoder (pickled: plain shifts, masks and tables, see
:mod:`agent.can.codec`). The long-running daemon then never holds cantools, python-can's file
formats it brings, or the parser's garbage: ~3 MiB less resident for as long as the car runs,
and a DBC that makes the parser blow up takes down only that child.
"""

from __future__ import annotations

import os
import pickle
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.signals.decoder import Decoder
from agent.signals.mapping import load_mapping
from agent.signals.model import Mapping

if TYPE_CHECKING:
    from agent.can.dbc import VehicleDatabase


@dataclass(frozen=True)
class Vehicle:
    config: AgentConfig
    database: VehicleDatabase
    mapping: Mapping

    def decoder(self) -> Decoder:
        """A fresh decoder (each has its own counters and freshness state)."""
        return Decoder(self.database, self.mapping)


def load_vehicle(config_path: str | Path) -> Vehicle:
    """Load config, DBCs and mapping; raise ConfigError naming the file and key at fault."""
    from agent.can.dbc import load_dbcs    # here: the daemon's own process never parses DBCs

    config = load_config(config_path)
    database = load_dbcs(config.dbc, config.dbc_encodings)
    mapping = load_mapping(config.mapping)
    vehicle = Vehicle(config, database, mapping)
    vehicle.decoder()  # binds mapping to DBC: every mapped message/signal must exist
    return vehicle


def compile_decoder(config_path: str | Path) -> tuple[AgentConfig, Decoder]:
    """The config and a fresh decoder, as :func:`load_vehicle` and :meth:`Vehicle.decoder`
    give them (the same one-line errors), with the DBC files loaded in a child process."""
    config = load_config(config_path)      # its errors come from here, before any fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                            # the child: load, build, send, and leave at once
        code = 1
        try:
            os.close(read_end)
            try:
                result: tuple[str, object] = ("decoder", load_vehicle(config_path).decoder())
            except ConfigError as exc:
                result = ("config error", str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug: its traceback goes to the parent
                result = ("failure", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(result, pickle.HIGHEST_PROTOCOL))
            code = 0
        finally:
            os._exit(code)                  # no atexit handlers, no flushing of our buffers
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise RuntimeError(f"{config_path}: the process loading the DBC files ended with "
                           f"status {os.waitstatus_to_exitcode(status)}")
    kind, value = pickle.loads(data)       # our own child, over a private pipe
    if kind == "config error":
        raise ConfigError(str(value))
    if kind == "failure":
        raise RuntimeError(f"loading the DBC files failed: {value}")
    assert isinstance(value, Decoder)
    return config, value
