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
