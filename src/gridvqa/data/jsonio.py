"""JSON and file I/O shared by every reader: clear errors on bad files, atomic writes (through
gridvqa.atomic, the one atomic-write helper)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gridvqa import atomic
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
    """Write `data` to `path` atomically (gridvqa.atomic): readers never see half a file."""
    return atomic.atomic_write_bytes(path, data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Serialise `obj` as json and write it atomically (a value json cannot hold leaves `path` as it was)."""
    return atomic.atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic.atomic_write_text(path, text)
