"""The signals wing: the VSS signal model, the mapping from DBC signals to VSS paths, the
decoder, the vehicle state with quality and age, and the publish policy.

Imports the foundation and :mod:`agent.can` only: it knows nothing of MQTT, signing or systemd,
so ``decode`` and the tests run it alone.
"""
