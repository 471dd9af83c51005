"""The cloud wing: everything that runs off the car and reads what cars publish: configuration,
message checks and revocation, and the ``watch`` command.

May import the foundation and the car's wings beneath it (:mod:`agent.uplink` for verifying
and TLS diagnosis); nothing on the car imports it. Its extra dependencies live in the
``cloud`` extra (``pip install car-agent[cloud]``).
"""
