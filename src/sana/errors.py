"""Errors a user can cause. The command line prints them as one line, never a traceback."""


class SanaError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(SanaError, ValueError):
    """A checkpoint cannot be read or does not fit the model: the message names the file or key."""


class ConfigError(SanaError, ValueError):
    """A configuration is invalid: the message names the field and the value."""
