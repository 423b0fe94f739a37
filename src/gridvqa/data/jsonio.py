"""JSON and file I/O shared by every reader: clear errors on bad files, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gridvqa.errors import DataError


def load_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a json file; a missing or malformed file raises a one-line DataError naming it.

    `what` says what the file is for (e.g. "VQA questions"), so the message tells the user which
    part of the layout is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {what} not found (expected this path)")
    try:
        with p.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: malformed json at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        # mkstemp makes owner-only files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Serialise `obj` as json and write it atomically."""
    return atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
