"""Exceptions with messages meant to be read by users: one line, naming the file and the problem."""

from __future__ import annotations

import errno

# OS errors a user fixes (permissions, a full or read-only disk, a wrong path), not bugs to debug.
_USER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "ENOTDIR", "EISDIR", "EEXIST")
    if hasattr(errno, name)
)


class GridVQAError(Exception):
    """Base class: the CLI entry points print these as one line instead of a traceback."""


class DataError(GridVQAError):
    """A data file is missing, malformed or inconsistent."""


class ConfigError(GridVQAError):
    """A configuration asks for something that cannot be done (e.g. a file that must be made first)."""


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def find_user_error(exc: BaseException) -> GridVQAError | None:
    """The GridVQAError behind an exception, if any: Hydra's instantiate and OmegaConf's resolvers
    wrap the errors our code raises, and entry points still want to print just our one line."""
    return next((e for e in _chain(exc) if isinstance(e, GridVQAError)), None)


def one_line(message: str) -> str:
    """`message` on one line: its non-blank lines joined with '; '."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def user_error_line(exc: BaseException) -> str | None:
    """What to tell a user about `exc` in one line, or None when it is a bug (its traceback is wanted).

    User errors: a GridVQAError anywhere in the exception's chain, else an OS error about a named file
    that the user can fix (no permission, disk full or read-only, no such file or folder).
    """
    user = find_user_error(exc)
    if user is not None:
        return one_line(str(user))
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS and e.filename is not None:
            return one_line(f"{e.filename}: {e.strerror or type(e).__name__}")
    return None
