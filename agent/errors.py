"""Errors a user can act on.

Every exception derived from :class:`UserError` carries a one-line message that names the
file, line or key at fault. The CLI prints it without a traceback (``--debug`` adds one).
"""


class UserError(Exception):
    """A mistake in input the user controls (config, mapping, DBC, capture, keys)."""


class ConfigError(UserError):
    """A config or mapping file is missing, malformed or inconsistent."""


class KeyFileError(UserError):
    """A key or certificate file is missing, malformed or has unsafe permissions."""


class TransientError(UserError):
    """A problem that may go away by itself (the CAN interface is not there yet).

    Exits with 75 (EX_TEMPFAIL) instead of 2, so that a service manager restarts the agent for
    this but not for a configuration mistake (``RestartPreventExitStatus=2`` in the unit).
    """

    exit_code = 75
