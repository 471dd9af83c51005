"""A vehicle definition: config + DBC files + mapping, loaded and cross-checked together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig, load_config
from agent.can.dbc import VehicleDatabase, load_dbcs
from agent.signals.decoder import Decoder
from agent.signals.mapping import load_mapping
from agent.signals.model import Mapping


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
    config = load_config(config_path)
    database = load_dbcs(config.dbc, config.dbc_encodings)
    mapping = load_mapping(config.mapping)
    vehicle = Vehicle(config, database, mapping)
    vehicle.decoder()  # binds mapping to DBC: every mapped message/signal must exist
    return vehicle
