"""The service wing: the ``run`` daemon that composes the car's wings, its systemd protocol
(sd_notify) and its logging.

Top of the head unit's code: imports the foundation, :mod:`agent.can`, :mod:`agent.signals` and
:mod:`agent.uplink`; never :mod:`agent.cloud` or :mod:`agent.dev` (a test checks the closure).
"""
