"""car-agent: reads a vehicle CAN bus, decodes it into COVESA VSS signals, signs and uplinks them.

Wings, in the order the data flows (a wing imports only the foundation and wings before it):

- foundation: :mod:`agent.errors`, :mod:`agent.schema` (YAML at the boundary),
  :mod:`agent.config` (the agent's config as frozen dataclasses);
- :mod:`agent.can` -> :mod:`agent.signals` -> :mod:`agent.uplink` -> :mod:`agent.service`:
  the head unit's code;
- :mod:`agent.cloud` and :mod:`agent.dev`: off the car, on top of the car's wings;
- :mod:`agent.cli`: the thin command line over all of them.
"""

__version__ = "0.1.0"
