"""Readers of a feature file: GridFeatures, RegionFeatures and open_features (which picks one by kind)."""

from __future__ import annotations

import bisect
import json
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gridvqa.data.features.format import ROW_FIELDS, parts_dir
from gridvqa.data.features.index import identity, load_index
from gridvqa.errors import DataError

# re-reads of the index when a writer replaced the file mid-read (about 2.5 s of back-off in all)
_ATTEMPTS = 10


class _Stale(Exception):
    """The file changed since its index was read."""


class _FeatureReader:
    """Shared reader logic.

    HDF5 handles are opened lazily in each process, so a reader can be handed to DataLoader workers (fork
    or spawn). An unconsolidated file is read straight from its part files (an image never spans two), not
    through the virtual datasets: a part once opened stays readable, and if a part vanished because the
    writer consolidated meanwhile, the reader reloads the file and reads the consolidated copy.
    """

    kind = ""
    max_open_parts = 64  # per process; part handles beyond this are closed least-recently-used first

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._load()
        self._handles: OrderedDict[str, h5py.File] = OrderedDict()
        self._pid = -1

    def _load(self) -> None:
        index = load_index(self.path)
        if index.kind != self.kind:
            raise DataError(f"{self.path}: a {index.kind} feature file, expected {self.kind}")
        self._index = index
        self._row = {image_id: i for i, image_id in enumerate(index.image_ids)}
        self._part_starts = index.part_starts()

    def __len__(self) -> int:
        return len(self._index.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, images={len(self)}, C={self.feature_dim})"

    @property
    def image_ids(self) -> list[int]:
        return list(self._index.image_ids)

    @property
    def provenance(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._index.provenance))

    @property
    def feature_dim(self) -> int:
        return self._index.feature_dim

    @property
    def dtype(self) -> str:
        return self._index.dtype

    def _entry(self, image_id: int) -> int:
        try:
            return self._row[image_id]
        except (KeyError, TypeError):
            raise KeyError(image_id) from None

    def _handle(self, name: str) -> h5py.File:
        if self._pid != os.getpid():
            # Handles inherited through fork must not be used (or closed) here: open our own.
            self._handles, self._pid = OrderedDict(), os.getpid()
        h = self._handles.get(name)
        if h is None:
            path = self.path if name == "" else parts_dir(self.path) / name
            h = h5py.File(path, "r")
            if name == "" and identity(path) != self._index.identity:
                h.close()  # a writer replaced the consolidated file we read the index of
                raise _Stale
            self._handles[name] = h
            if len(self._handles) > self.max_open_parts:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(name)
        return h

    def _fetch(self, image_id: int, names: Iterable[str]) -> tuple[int, dict[str, np.ndarray]]:
        """(entry, {dataset: rows of this image}); KeyError for an id not in the file."""
        for attempt in range(_ATTEMPTS):
            i = self._entry(image_id)
            start = self._index.offset[i]
            stop = start + int(np.prod(self._index.extent[i]))
            part = ""
            if self._index.parts:
                k = bisect.bisect_right(self._part_starts, start) - 1
                part = self._index.parts[k][0]
                start, stop = start - self._part_starts[k], stop - self._part_starts[k]
            try:
                f = self._handle(part)
            except (_Stale, OSError) as e:
                if attempt == _ATTEMPTS - 1:
                    why = str(e).splitlines()[0] if str(e) else "it keeps changing"
                    raise DataError(f"{self.path}: cannot read image {image_id} ({why})") from None
                self.close()
                if attempt:  # writers committing image by image can replace it again at once: back off
                    time.sleep(min(0.5, 0.005 * 2**attempt))
                self._load()  # a writer consolidated (or replaced) the file since we read its index
                continue
            return i, {name: f[name][start:stop] for name in names}
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._pid == os.getpid():
            for h in self._handles.values():
                h.close()
        self._handles, self._pid = OrderedDict(), -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handles=OrderedDict(), _pid=-1)
        return state

    def __enter__(self) -> _FeatureReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GridFeatures(_FeatureReader):
    """Reader of a grid feature file: `get(id)` -> {"grid": [H, W, C], "image_size": (h, w)}."""

    kind = "grid"

    def grid_shape(self, image_id: int) -> tuple[int, int]:
        h, w = self._index.extent[self._entry(image_id)]
        return h, w

    @property
    def max_cells(self) -> int:
        return max((h * w for h, w in self._index.extent), default=0)

    def get(self, image_id: int) -> dict[str, Any]:
        i, rows = self._fetch(image_id, ("features",))
        h, w = self._index.extent[i]
        return {"grid": rows["features"].reshape(h, w, -1), "image_size": self._index.image_size[i]}


class RegionFeatures(_FeatureReader):
    """Reader of a region feature file: `get(id)` -> features [N, C], boxes [N, 4], image_size (h, w),
    labels [N], scores [N] and, when the file has them, attr_labels / attr_scores [N, ...]."""

    kind = "region"

    def num_boxes(self, image_id: int) -> int:
        return self._index.extent[self._entry(image_id)][0]

    @property
    def max_boxes(self) -> int:
        return max((e[0] for e in self._index.extent), default=0)

    @property
    def has_attributes(self) -> bool:
        return "attr_labels" in (self._index.fields or {})

    def get(self, image_id: int) -> dict[str, Any]:
        names = [n for n in ROW_FIELDS["region"] if n in (self._index.fields or {})]
        i, out = self._fetch(image_id, names)
        out["image_size"] = self._index.image_size[i]
        return out


def open_features(path: str | os.PathLike) -> GridFeatures | RegionFeatures:
    """Open a feature file with the reader its `kind` attribute names."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: feature file not found")
    try:
        with h5py.File(p, "r") as f:
            kind = f.attrs.get("kind")
    except OSError as e:
        raise DataError(f"{p}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    if kind == "grid":
        return GridFeatures(p)
    if kind == "region":
        return RegionFeatures(p)
    raise DataError(
        f"{p}: not a gridvqa feature file (kind attribute is {kind!r}, expected 'grid' or 'region')"
    )
