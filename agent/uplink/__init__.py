"""The uplink wing: signing (JWS), signed envelopes, the durable outbox, the MQTT 5 client over
mutual TLS, TLS diagnosis and the checks on key files.

Imports the foundation, :mod:`agent.can` and :mod:`agent.signals`; never the service, the
cloud or the development tools.
"""
