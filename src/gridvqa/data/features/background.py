"""FeatureWriter(background=True): HDF5 writes and fsync'd commits in one thread, off the caller's.

The caller checks each image and puts it on a bounded queue (put blocks while the queue is full, so a
slow disk holds the producer back instead of filling memory); the thread buffers images and commits on
the same rules as a foreground writer, plus on time. What is committed, and in which order, is exactly
what a foreground writer would commit, so a kill and resume behave the same. An exception in the thread
is kept and raised in the caller at its next call; the thread then only drains the queue, so a caller
blocked on a full queue or waiting on a flush never hangs.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from gridvqa.data.features.store import Image, PartStore

_POLL_S = 0.5  # how often a blocked caller checks that the thread is still there


class CommitThread:
    def __init__(self, store: PartStore, queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.store = store
        self.error: BaseException | None = None
        self.committed = 0  # images committed by the thread (only the thread writes it)
        self._stopping = False
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        # daemon: a process that exits without close() loses the uncommitted images, as after a kill
        name = f"FeatureWriter:{store.path.name}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- caller side -----------------------------------------------------------------------------
    def _put(self, message: tuple[str, Any]) -> None:
        while True:
            try:
                self._queue.put(message, timeout=_POLL_S)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError(f"{self.store.path}: the writer thread has stopped") from self.error

    def add(self, image: Image) -> None:
        self._put(("image", image))

    def commit(self, wait: bool) -> None:
        """Ask for a commit of everything put so far; with `wait`, return once it is done (or failed)."""
        done = threading.Event() if wait else None
        self._put(("commit", done))
        while done is not None and not done.wait(_POLL_S):
            if not self._thread.is_alive():
                return

    def stop(self) -> None:
        """Commit what is left and end the thread."""
        if self._thread.is_alive():
            self._put(("stop", None))
            self._thread.join()

    # -- thread side -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # kept for the caller: raised at its next add / flush / close
            self.error = e
            if not self._stopping:
                self._drain()

    def _commit(self) -> None:
        n = len(self.store.buffer)
        self.store.commit()
        self.committed += n

    def _serve(self) -> None:
        while True:
            due = self.store.commit_due()
            if due == 0.0:
                self._commit()
                continue
            try:
                kind, payload = self._queue.get(timeout=due)
            except queue.Empty:  # commit_seconds passed
                continue
            if kind == "image":
                self.store.append(payload)
            elif kind == "commit":
                try:
                    self._commit()
                finally:
                    if payload is not None:
                        payload.set()
            else:
                self._stopping = True  # nothing more will come: no draining after an error
                self._commit()
                return

    def _drain(self) -> None:
        while True:
            kind, payload = self._queue.get()
            if kind == "commit" and payload is not None:
                payload.set()
            elif kind == "stop":
                return
