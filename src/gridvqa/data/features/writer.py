"""FeatureWriter: append images to a feature file; resumable and safe against being killed at any moment."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gridvqa.data.features.background import CommitThread
from gridvqa.data.features.format import (
    DTYPES,
    FLOAT16_MAX,
    KINDS,
    OPTIONAL,
    Fields,
    fill_value,
    normalise_provenance,
    parts_dir,
)
from gridvqa.data.features.lock import WriterLock
from gridvqa.data.features.store import Image, PartStore


class FeatureWriter:
    """Append images to a feature file; resumable and safe against being killed at any moment.

    Images are buffered and committed as one part file when `commit_bytes` of features, or `commit_images`
    images, are waiting, when the oldest waiting image is `commit_seconds` old, or on `flush()`; a kill
    loses at most the uncommitted images (`pending`; the extractor redoes them: `done_ids`).
    Re-adding an id already in `done_ids` is ignored (`add_*` returns False), so a resumed extractor may
    simply replay its image list. On an existing file whose provenance differs the writer refuses, unless
    `overwrite=True`: then the old file stays intact and readable until the new run's first commit replaces
    it atomically (no delete-then-recreate window). `close()` consolidates the parts into one plain file
    unless `consolidate=False` (that copies the data once; skip it for very large files).

    `background=True` does the HDF5 writes and commits in one writer thread: `add_*` checks the image in
    the caller's thread and hands it over through a queue of `queue_size` images (blocking while it is
    full). The file, the commits and their order are the same as without it. An exception in the thread is
    raised in the caller at its next `add_*`, `flush` or `close`. Arrays handed to `add_*` must not be
    modified afterwards (the writer keeps them until they are written, in both modes).

    Only one writer per file: while another holds it, the constructor raises DataError naming the file and
    the holder's pid, or with `lock_timeout` waits that many seconds first (None: as long as it takes).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str,
        provenance: Mapping[str, Any],
        dtype: str = "float16",
        overwrite: bool = False,
        *,
        commit_bytes: int = 256 << 20,
        commit_images: int | None = None,
        commit_seconds: float | None = None,
        consolidate: bool = True,
        lock_timeout: float | None = 0.0,
        background: bool = False,
        queue_size: int = 16,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        dtype = np.dtype(dtype).name
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if commit_images is not None and commit_images < 1:
            raise ValueError(f"commit_images must be >= 1 or None, got {commit_images}")
        if background and queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.path = Path(path)
        self.kind = kind
        self.dtype = dtype
        self.consolidate = consolidate
        self.provenance = normalise_provenance(provenance, kind, dtype)
        self._lock = WriterLock(self.path, parts_dir(self.path), lock_timeout)
        self._closed = False
        try:
            self._store = PartStore(
                self.path,
                kind,
                self.provenance,
                overwrite,
                commit_bytes=commit_bytes,
                commit_images=commit_images,
                commit_seconds=commit_seconds,
            )
        except BaseException:
            self._lock.release()
            raise
        self._fields: Fields | None = self._store.index.fields
        self._done: set[int] = set(self._store.index.image_ids)
        self._added = 0  # images handed to the store or the thread
        self._error_raised = False
        self._thread = CommitThread(self._store, queue_size) if background else None

    @property
    def commit_bytes(self) -> int:
        return self._store.commit_bytes

    # -- public state ----------------------------------------------------------------------------
    @property
    def done_ids(self) -> set[int]:
        """Ids committed, buffered or queued (the live set: read it, do not modify it)."""
        return self._done

    @property
    def pending(self) -> int:
        """Images added and not yet committed (lost if the process dies now)."""
        if self._thread is None:
            return len(self._store.buffer)
        return self._added - self._thread.committed

    @property
    def feature_dim(self) -> int:
        return int(self._fields["features"][1][0]) if self._fields else self._store.index.feature_dim

    def missing(self, expected_ids: Iterable[int]) -> list[int]:
        """The ids of `expected_ids` not yet done, in their order: what is left to extract."""
        return [int(i) for i in expected_ids if int(i) not in self._done]

    def is_complete(self, expected_ids: Iterable[int]) -> bool:
        return not self.missing(expected_ids)

    # -- adding ----------------------------------------------------------------------------------
    def _raise_thread_error(self) -> None:
        if self._thread is not None and self._thread.error is not None:
            self._error_raised = True
            raise self._thread.error

    def _new_id(self, kind: str, image_id: int) -> int | None:
        """The id as an int if `add_<kind>` may add it; None when it is already done."""
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        self._raise_thread_error()
        if kind != self.kind:
            raise ValueError(f"{self.path}: this is a {self.kind} feature file; add_{kind} does not apply")
        image_id = operator.index(image_id)
        return None if image_id in self._done else image_id

    def _cast_features(self, image_id: int, x: np.ndarray) -> np.ndarray:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{self.path}: image {image_id}: features must be floating point, got {x.dtype}")
        if self.dtype == "float16" and x.dtype != np.float16 and x.size and np.abs(x).max() > FLOAT16_MAX:
            raise ValueError(f"{self.path}: image {image_id}: features overflow float16; use dtype='float32'")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _check_fields(self, image_id: int, rows: dict[str, np.ndarray]) -> None:
        """The first image fixes C and the optional fields; later images must agree."""
        got = {name: (a.dtype, a.shape[1:]) for name, a in rows.items()}
        if self._fields is None:
            self._fields = got
            return
        want = self._fields
        for name in set(want) | set(got):
            if name not in got or name not in want:
                has = "has" if name in want else "has no"
                raise ValueError(
                    f"{self.path}: image {image_id}: the file {has} {name}; give it for all or none"
                )
            if got[name][1] != want[name][1]:
                raise ValueError(
                    f"{self.path}: image {image_id}: {name} rows have shape {got[name][1]}, the file has "
                    f"{want[name][1]}"
                )

    def _add(
        self, image_id: int, image_size: Any, extent: tuple[int, ...], rows: dict[str, np.ndarray]
    ) -> None:
        try:
            h, w = (operator.index(v) for v in np.asarray(image_size).tolist())
        except (TypeError, ValueError):
            h = w = 0
        if h < 1 or w < 1:
            raise ValueError(
                f"{self.path}: image {image_id}: image_size must be (h, w) > 0, got {image_size!r}"
            )
        self._check_fields(image_id, rows)
        image: Image = (image_id, (h, w), extent, rows)
        if self._thread is not None:
            self._thread.add(image)
        else:
            self._store.append(image)
        self._added += 1
        self._done.add(image_id)
        if self._thread is None and self._store.commit_due() == 0.0:
            self._store.commit()

    def add_grid(self, image_id: int, grid: Any, image_size: Any) -> bool:
        """Add one image's res5 map `grid` [H, W, C] and its original (h, w); False if the id is done."""
        image_id = self._new_id("grid", image_id)
        if image_id is None:
            return False
        g = np.asarray(grid)
        if g.ndim != 3 or min(g.shape) < 1:
            raise ValueError(f"{self.path}: image {image_id}: grid must be [H, W, C], got shape {g.shape}")
        rows = {"features": self._cast_features(image_id, g.reshape(-1, g.shape[2]))}
        self._add(image_id, image_size, (g.shape[0], g.shape[1]), rows)
        return True

    def add_region(
        self,
        image_id: int,
        features: Any,
        boxes: Any,
        image_size: Any,
        labels: Any = None,
        scores: Any = None,
        attr_labels: Any = None,
        attr_scores: Any = None,
    ) -> bool:
        """Add one image's N boxes: features [N, C], boxes [N, 4] (x1, y1, x2, y2 in original pixels),
        optional labels / scores [N] and attribute labels / scores [N, ...]; False if the id is done."""
        image_id = self._new_id("region", image_id)
        if image_id is None:
            return False
        feats = np.asarray(features)
        if feats.ndim != 2 or min(feats.shape) < 1:
            raise ValueError(
                f"{self.path}: image {image_id}: features must be [N, C], got shape {feats.shape}"
            )
        rows = {"features": self._cast_features(image_id, feats)}
        given = {
            "boxes": boxes,
            "labels": labels,
            "scores": scores,
            "attr_labels": attr_labels,
            "attr_scores": attr_scores,
        }
        for name, value in given.items():
            if value is not None or name not in OPTIONAL:
                rows[name] = self._region_field(image_id, name, value, feats.shape[0])
        self._add(image_id, image_size, (feats.shape[0],), rows)
        return True

    def _region_field(self, image_id: int, name: str, value: Any, n: int) -> np.ndarray:
        dtype = np.int32 if name.endswith("labels") else np.float32
        if value is None:  # labels / scores the extractor did not give
            return np.full(n, fill_value(np.dtype(dtype)), dtype)
        a = np.asarray(value)
        if name.endswith("labels") and a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{self.path}: image {image_id}: {name} must be integers, got {a.dtype}")
        want = (n, 4) if name == "boxes" else (n,) if name in ("labels", "scores") else None
        if (want is not None and a.shape != want) or (want is None and (a.ndim < 1 or a.shape[0] != n)):
            raise ValueError(
                f"{self.path}: image {image_id}: {name} has shape {a.shape}, expected {want or (n, '...')}"
            )
        return np.ascontiguousarray(a, dtype=dtype)

    # -- committing ------------------------------------------------------------------------------
    def flush(self, wait: bool = True) -> None:
        """Commit the images added so far: once this returns they survive a kill.

        With a background writer, `wait=False` only asks for the commit and returns at once.
        """
        if self._closed:
            return
        self._raise_thread_error()
        if self._thread is None:
            self._store.commit()
            return
        self._thread.commit(wait)
        if wait:
            self._raise_thread_error()

    def close(self, consolidate: bool | None = None) -> Path:
        """Commit what is left, consolidate (default: the constructor's choice), release the lock."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            if self._thread is not None:
                self._thread.stop()
                if self._thread.error is not None:
                    if self._error_raised:  # the caller has seen it: just let go of the file
                        return self.path
                    self._raise_thread_error()
            else:
                self._store.commit()
            if self.consolidate if consolidate is None else consolidate:
                self._store.consolidate()
        finally:
            self._lock.release()
        return self.path

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an error the buffered images are still complete: keep them, but leave consolidation for later.
        self.close(consolidate=None if exc_type is None else False)
