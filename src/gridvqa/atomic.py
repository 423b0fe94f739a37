"""The one way gridvqa writes a file: a temporary file beside the target, fsynced, renamed over it.

A reader (or a resumed run) sees either the previous file or the complete new one, never half a file,
whatever kills the writer. Temporary names are hidden, carry the writer's pid and a random tail, and
never contain the target's name (Lightning finds `hpc_ckpt_<n>` files by substring); `clean_stale`
removes those left by a process that no longer runs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".partial-"


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name in `target`'s folder (same file system, so the rename is atomic)."""
    target = Path(target)
    return target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a rename survives a power cut only once its folder entry is on disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def replace_atomically(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """fsync `tmp`, rename it over `target`, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(Path(target).parent)


def _default_permissions(path: Path) -> None:
    # mkstemp-style files are owner-only; the result gets what a plain open() would give it
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # ours: another thread may be writing it (a write that raises removes its own file)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(folder: str | os.PathLike) -> int:
    """Remove temporary files in `folder` left by writers that no longer run; returns how many."""
    removed = 0
    for left in Path(folder).glob(f"{TEMP_PREFIX}*.tmp"):
        try:
            pid = int(left.name[len(TEMP_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            left.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `target` through (torch.save, h5py, shutil.copyfile, ...).

    On a clean exit the file is fsynced and renamed over `target`; on an exception it is removed and
    `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        yield tmp
        if tmp.exists():
            _default_permissions(tmp)
        replace_atomically(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))
