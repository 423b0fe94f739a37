"""Exceptions with messages meant to be read by users: one line, naming the file and the problem."""


class GridVQAError(Exception):
    """Base class: the CLI entry points print these as one line instead of a traceback."""


class DataError(GridVQAError):
    """A data file is missing, malformed or inconsistent."""


class ConfigError(GridVQAError):
    """A configuration asks for something that cannot be done (e.g. a file that must be made first)."""
