"""One writer at a time per feature file: an exclusive flock on <file>.parts/writer.lock."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from gridvqa.errors import DataError, GridVQAError

try:  # absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "writer.lock"
_POLL_S = 0.02


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _flock(lock: Any, deadline: float | None) -> bool:
    """Take the exclusive lock on the open file `lock`; False if it is still held at `deadline`."""
    if deadline is None:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return True
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_POLL_S, left))


class WriterLock:
    """The exclusive lock of `path` (a feature file) on `folder`/writer.lock, held from creation to release().

    The last writer removes the lock file and the folder while still holding the lock; a writer that wins
    the lock therefore checks that its lock file is still the one at that path (same inode) and starts over
    otherwise, so a lock on a removed file never counts.
    """

    def __init__(self, path: Path, folder: Path, timeout: float | None) -> None:
        if fcntl is None:  # pragma: no cover
            raise GridVQAError(f"{path}: writing feature files needs POSIX file locks (fcntl)")
        self.path, self.folder = path, folder
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        self._file = self._acquire(folder / LOCK_NAME, deadline)
        self.held = True

    def _acquire(self, lock_path: Path, deadline: float | None) -> Any:
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except (FileNotFoundError, FileExistsError):
                # the last writer removed the folder just now (mkdir saw it, is_dir() did not)
                if self.folder.exists() and not self.folder.is_dir():
                    raise DataError(f"{self.path}: {self.folder} is in the way (not a folder)") from None
                continue
            except OSError as e:
                raise DataError(f"{self.path}: cannot create {lock_path} ({e.strerror or e})") from None
            lock = os.fdopen(fd, "r+b", buffering=0)
            try:
                if not _flock(lock, deadline):
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    raise DataError(
                        f"{self.path}: another FeatureWriter{f' (pid {holder})' if holder else ''} is "
                        "writing this file; run again when it has finished"
                    )
                st = os.fstat(fd)
                if _inode(lock_path) == (st.st_dev, st.st_ino):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    return lock
            except BaseException:
                lock.close()
                raise
            lock.close()  # we locked a file the previous holder had removed: not the lock any more

    def release(self) -> None:
        """Remove the folder when nothing but the lock is left in it, then drop the lock.

        Both removals happen while the lock is held; a writer waiting on the removed lock file sees that
        it is gone once it gets the lock, and starts over.
        """
        if not self.held:
            return
        self.held = False
        try:
            if not any(p.name != LOCK_NAME for p in self.folder.iterdir()):
                (self.folder / LOCK_NAME).unlink()
                try:
                    self.folder.rmdir()
                except OSError:  # the next writer already put its lock file there
                    pass
        except OSError:  # someone removed the folder under us: nothing left to tidy
            pass
        finally:
            self._file.close()
