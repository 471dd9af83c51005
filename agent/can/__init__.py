"""The CAN wing: where frames come from (capture readers, live python-can sources) and the DBC
files that describe them.

Imports only the foundation (:mod:`agent.errors`, :mod:`agent.schema`, :mod:`agent.config`),
python-can and cantools: nothing about signals, MQTT, signing, systemd or the cloud.
"""
