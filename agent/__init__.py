"""car-agent: reads a vehicle CAN bus, decodes it into COVESA VSS signals, signs and uplinks them."""

__version__ = "0.1.0"
