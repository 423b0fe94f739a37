"""Exceptions with messages meant to be read by users: one line, naming the file and the problem."""


class GridVQAError(Exception):
    """Base class: the CLI entry points print these as one line instead of a traceback."""


class DataError(GridVQAError):
    """A data file is missing, malformed or inconsistent."""


class ConfigError(GridVQAError):
    """A configuration asks for something that cannot be done (e.g. a file that must be made first)."""


def find_user_error(exc: BaseException) -> GridVQAError | None:
    """The GridVQAError behind an exception, if any: Hydra's instantiate and OmegaConf's resolvers
    wrap the errors our code raises, and entry points still want to print just our one line."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, GridVQAError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
