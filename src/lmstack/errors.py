"""Errors a user can fix: printed as one paragraph, without a traceback."""


class LmstackError(Exception):
    """Base class: bad input that the user can correct."""


class ConfigError(LmstackError):
    """A config value that is wrong, named by its key."""


class DataError(LmstackError):
    """A data file or row that is wrong, named by file and line."""
