"""HDF5 feature store: grid and region features extracted once per split, read by the VQA data modules.

File format (``format = "gridvqa-features"``, ``format_version = 1``)
--------------------------------------------------------------------
One HDF5 file per split and kind. Images are stored in the order they were written (not sorted by id).

Root attributes:
  format          "gridvqa-features"
  format_version  1
  kind            "grid" | "region"
  dtype           "float16" | "float32"  -- the dtype of ``features``
  feature_dim     C, the channel count (0 while the file holds no image)
  code_version    gridvqa version that wrote the file
  provenance_json JSON object with the whole provenance: every key the extractor passed (backbone,
                  checkpoint hash, resize rule, ...) plus kind, dtype and code_version
  <key>           each provenance key also as its own attribute: str / int / float / bool as is,
                  any other value (list, dict, None) as JSON text

Per-image datasets (N images; entry i describes image i):
  image_ids   int64 [N]     image id (unique)
  image_size  int32 [N, 2]  (height, width) of the original image in pixels
  offset      int64 [N]     first row of the image in the per-row datasets below
  grid_shape  int32 [N, 2]  grid files only: (H, W); the image owns rows offset .. offset + H*W,
                            row-major (cell (y, x) is row offset + y*W + x)
  num_boxes   int32 [N]     region files only: the image owns rows offset .. offset + num_boxes

Per-row datasets (R rows in all: grid cells or boxes):
  features     <dtype> [R, C]  res5 vector of a grid cell / pooled vector of a box
  boxes        float32 [R, 4]  region only: x1, y1, x2, y2 in original-image pixels
  labels       int32 [R]       region only: predicted object class (-1 where the extractor gave none)
  scores       float32 [R]     region only: its score (NaN where the extractor gave none)
  attr_labels  int32 [R, ...]  region only, present only if the extractor gave attributes
  attr_scores  float32 [R, ...]  (same; trailing shape fixed per file, e.g. [R] or [R, K])

Two physical forms with the same names and meaning; h5py hides the difference:
  finished (consolidated) -- every dataset is an ordinary contiguous dataset in this one file;
  in progress / interrupted -- the per-row datasets are HDF5 *virtual* datasets whose pieces are
  immutable files ``<file>.parts/part-NNNNNN-<random>.h5`` beside the file (relative paths: move the folder
  with the file; a name is never reused, so a reader holding an older index cannot read another part);
  datasets ``part_files`` (str [P]) and ``part_rows`` (int64 [P]) list them in row order.

Reading one image with plain h5py:
  with h5py.File(path, "r") as f:
      i = list(f["image_ids"][:]).index(image_id)
      o = int(f["offset"][i])
      h, w = f["grid_shape"][i]                          # grid file
      grid = f["features"][o:o + h * w].reshape(h, w, -1)
      n = int(f["num_boxes"][i])                         # region file
      feats, boxes = f["features"][o:o + n], f["boxes"][o:o + n]

Crash safety (why not SWMR): an HDF5 file is never modified in place. Buffered images are written as a new
part file (temp name, fsync, rename), then a small index file naming all parts replaces ``<file>``
atomically. A process killed at any moment (SIGKILL) leaves either the previous or the next index, both
complete: finished images are intact and half-written ones are invisible. A writer opened on the same
path resumes (``done_ids``) and removes leftovers (``.<file>.*.tmp``, unreferenced parts). ``close()``
consolidates parts into one plain file (temp + rename again), then deletes them: a plain-h5py reader that
opened the file before must open it again (our readers do that by themselves). HDF5's own SWMR mode was
tried and rejected: after a SIGKILL the file cannot be reopened for writing (its status flags need the
h5clear tool) and plain ``"r"`` opens fail.

Damaged parts (a disk error, a partial copy): readers and writers open every part file when they open
the feature file. A reader refuses the file with one line naming the part; a writer logs a warning naming
it and drops its images from the index, so a resumed extraction extracts them again.

One writer at a time: a writer holds an exclusive ``flock`` on ``<file>.parts/writer.lock`` from its
constructor to ``close()``; a second writer fails at once with one line naming the file and the holder's
pid (or waits, with ``lock_timeout``). Two extractions of one file would only compute the same images twice,
so failing is what a user wants by default. The last writer removes the lock file and the folder while
still holding the lock; a writer that wins the lock therefore checks that its lock file is still the one
at that path (same inode) and starts over otherwise, so a lock on a removed file never counts. POSIX
only (fcntl): elsewhere a writer refuses to start.
"""

from __future__ import annotations

import bisect
import json
import logging
import operator
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gridvqa import __version__
from gridvqa.errors import DataError, GridVQAError

try:  # the writer lock; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = "gridvqa-features"
FORMAT_VERSION = 1
KINDS = ("grid", "region")
DTYPES = ("float16", "float32")
_RESERVED = {"format", "format_version", "feature_dim", "provenance_json"}
_PER_IMAGE = {"grid": "grid_shape", "region": "num_boxes"}
_ROW_FIELDS = {
    "grid": ("features",),
    "region": ("features", "boxes", "labels", "scores", "attr_labels", "attr_scores"),
}
_OPTIONAL = ("attr_labels", "attr_scores")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_COPY_BLOCK_BYTES = 64 << 20
_LOCK_NAME = "writer.lock"
_LOCK_POLL_S = 0.02


@dataclass
class _Index:
    """Everything a file says except the per-row arrays themselves."""

    kind: str
    provenance: dict[str, Any]
    feature_dim: int
    image_ids: list[int] = field(default_factory=list)
    image_size: list[tuple[int, int]] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    extent: list[tuple[int, ...]] = field(default_factory=list)  # (H, W) per grid image, (n,) per region
    fields: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None  # None until the first image
    parts: list[tuple[str, int]] = field(default_factory=list)  # (file name in <file>.parts, rows)
    total_rows: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # part name -> why it cannot be read
    identity: tuple[int, ...] | None = None  # _identity() of the file this index was read from

    @property
    def dtype(self) -> str:
        return self.provenance["dtype"]


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _tmp_path(folder: Path, stem: str) -> Path:
    return folder / f".{stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; rename atomicity still holds
        pass
    finally:
        os.close(fd)


def _replace(tmp: Path, dst: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, dst)
    _fsync(dst.parent)


class _Unreadable(DataError):
    """The file is ours or meant to be, but cannot be read (truncated, damaged): starting afresh fixes it."""


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _identity(path: Path) -> tuple[int, ...] | None:
    """Tells a replaced file from the one read before (an inode number alone may be reused at once)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _load_index(path: Path, *, keep_damaged: bool = False) -> _Index:
    """Read and check a feature file's attributes and per-image datasets, and open each part file.

    A missing or damaged part raises DataError naming it, unless `keep_damaged` (the writer, which holds
    the lock and drops those images): then `_Index.damaged` lists them.
    """
    for _ in range(5):
        index = _load_index_once(path)
        if index.identity is None:  # replaced while being opened
            continue
        if not index.damaged or keep_damaged:
            return index
        # A writer consolidating right now removes parts just after replacing the file: read it again.
        if _identity(path) != index.identity:
            continue
        name, why = next(iter(index.damaged.items()))
        part = _parts_dir(path) / name
        if why == "missing":
            raise DataError(f"{path}: part file {part} is missing (move it with the file)")
        raise DataError(
            f"{path}: part file {part} is damaged ({why}); run the extraction again to redo its images"
        )
    raise DataError(f"{path}: the file keeps changing while being opened")


def _part_problem(
    part: Path, rows: int, fields: Mapping[str, tuple[np.dtype, tuple[int, ...]]]
) -> str | None:
    """Why a part file cannot serve its `rows` rows of `fields` (None when it can)."""
    if not part.is_file():
        return "missing"
    try:
        with h5py.File(part, "r") as f:
            for key, (dt, trailing) in fields.items():
                if key not in f:
                    return f"no {key} dataset"
                ds = f[key]
                if ds.shape != (rows, *trailing) or ds.dtype != dt:
                    return f"{key} is {ds.dtype} {ds.shape}, the index says {dt} {(rows, *trailing)}"
                if rows:
                    ds[rows - 1]  # the last row is really there
    except FileNotFoundError:
        return "missing"
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        return f"not a readable HDF5 file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def _load_index_once(path: Path) -> _Index:
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    before = _identity(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if _identity(path) != before:  # replaced while being opened
            return _Index(kind="grid", provenance={}, feature_dim=0)
        raise _Unreadable(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    identity = before if _identity(path) == before else None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise DataError(f"{path}: not a gridvqa feature file (no format={FORMAT!r} attribute)")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise DataError(f"{path}: feature format version {version}, this code reads {FORMAT_VERSION}")
        try:
            prov = json.loads(f.attrs["provenance_json"])
            kind = prov["kind"]
            if kind not in KINDS or prov.get("dtype") not in DTYPES:
                raise ValueError(f"kind {kind!r} / dtype {prov.get('dtype')!r}")
            extent_name = _PER_IMAGE[kind]
            ids = f["image_ids"][:].astype(np.int64)
            size = f["image_size"][:]
            offset = f["offset"][:].astype(np.int64)
            extent = f[extent_name][:].astype(np.int64)
            n = len(ids)
            fields = {
                name: (f[name].dtype, tuple(f[name].shape[1:])) for name in _ROW_FIELDS[kind] if name in f
            }
            rows = {f[name].shape[0] for name in fields}
            parts: list[tuple[str, int]] = []
            if "part_files" in f:
                parts = list(zip(f["part_files"].asstr()[:], map(int, f["part_rows"][:]), strict=True))
        except (KeyError, ValueError, TypeError, OSError, json.JSONDecodeError) as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise _Unreadable(f"{path}: malformed feature file ({type(e).__name__}: {msg})") from None
    if extent.ndim == 1:
        extent = extent[:, None]
    if (
        len(size) != n
        or len(offset) != n
        or len(extent) != n
        or len(rows) != 1
        or "features" not in fields
        or (kind == "region" and {"boxes", "labels", "scores"} - set(fields))
    ):
        raise _Unreadable(
            f"{path}: malformed feature file (per-image or per-row datasets disagree in length)"
        )
    total = rows.pop()
    counts = np.prod(extent, axis=1) if n else np.zeros(0, np.int64)
    if n and (offset.min() < 0 or (offset + counts).max() > total or counts.min() < 1):
        raise _Unreadable(f"{path}: malformed feature file (an image's rows fall outside the {total} rows)")
    if len(set(ids.tolist())) != n:
        raise _Unreadable(f"{path}: malformed feature file (duplicate image ids)")
    if parts and sum(r for _, r in parts) != total:
        raise _Unreadable(f"{path}: malformed feature file (part_rows do not add up to {total} rows)")
    damaged = {}
    for name, r in parts:
        why = _part_problem(_parts_dir(path) / name, r, fields)
        if why is not None:
            damaged[name] = why
    return _Index(
        kind=kind,
        provenance=prov,
        feature_dim=int(fields["features"][1][0]) if fields["features"][1] else 0,
        image_ids=ids.tolist(),
        image_size=[(int(h), int(w)) for h, w in size],
        offset=offset.tolist(),
        extent=[tuple(int(v) for v in e) for e in extent],
        fields=fields if n else None,  # an empty file has not fixed C or the attribute fields yet
        parts=parts,
        total_rows=total,
        damaged=damaged,
        identity=identity,
    )


def _without_parts(index: _Index, drop: set[str]) -> _Index:
    """`index` less the parts in `drop` and the images stored in them (an image never spans two parts)."""
    starts = np.cumsum([0] + [n for _, n in index.parts])[:-1].tolist()
    shift, removed, parts = [], 0, []
    for name, n in index.parts:
        shift.append(removed)
        if name in drop:
            removed += n
        else:
            parts.append((name, n))
    out = _Index(kind=index.kind, provenance=index.provenance, feature_dim=index.feature_dim, parts=parts)
    for i, o in enumerate(index.offset):
        k = bisect.bisect_right(starts, o) - 1
        if index.parts[k][0] in drop:
            continue
        out.image_ids.append(index.image_ids[i])
        out.image_size.append(index.image_size[i])
        out.offset.append(o - shift[k])
        out.extent.append(index.extent[i])
    out.total_rows = index.total_rows - removed
    if out.image_ids:
        out.fields = index.fields
    else:  # like a new file: the next image fixes C and the optional fields again
        out.feature_dim = 0
    return out


def _write_attrs(f: h5py.File, index: _Index) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["feature_dim"] = index.feature_dim
    f.attrs["provenance_json"] = json.dumps(index.provenance, sort_keys=True)
    for key, value in index.provenance.items():
        scalar = isinstance(value, (str, bool, float)) or (isinstance(value, int) and abs(value) < 2**63)
        f.attrs[key] = value if scalar else json.dumps(value, sort_keys=True)


def _write_per_image(f: h5py.File, index: _Index) -> None:
    n = len(index.image_ids)
    f.create_dataset("image_ids", data=np.asarray(index.image_ids, np.int64).reshape(n))
    f.create_dataset("image_size", data=np.asarray(index.image_size, np.int32).reshape(n, 2))
    f.create_dataset("offset", data=np.asarray(index.offset, np.int64).reshape(n))
    extent = np.asarray(index.extent, np.int32)
    if index.kind == "grid":
        f.create_dataset("grid_shape", data=extent.reshape(n, 2))
    else:
        f.create_dataset("num_boxes", data=extent.reshape(n))


def _default_fields(kind: str, dtype: str, feature_dim: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    fields = {"features": (np.dtype(dtype), (feature_dim,))}
    if kind == "region":
        fields.update(
            boxes=(np.dtype(np.float32), (4,)),
            labels=(np.dtype(np.int32), ()),
            scores=(np.dtype(np.float32), ()),
        )
    return fields


def _fill(dtype: np.dtype) -> Any:
    return np.nan if np.issubdtype(dtype, np.floating) else -1


def _normalise_provenance(provenance: Mapping[str, Any], kind: str, dtype: str) -> dict[str, Any]:
    ours = {"kind": kind, "dtype": dtype, "code_version": __version__}
    prov: dict[str, Any] = {}
    for key, value in provenance.items():
        if not isinstance(key, str) or not key or key in _RESERVED:
            raise ValueError(f"provenance key {key!r} is not allowed (reserved: {sorted(_RESERVED)})")
        if key in ours and value != ours[key]:
            raise ValueError(f"provenance[{key!r}] = {value!r} contradicts the writer's {key}={ours[key]!r}")
        try:  # round-trip so tuples/lists and the file's JSON compare equal
            prov[key] = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"provenance[{key!r}] is not JSON-serialisable: {e}") from None
    prov.update(ours)
    return prov


def _provenance_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            shown = ["<absent>" if v is missing else repr(v) for v in (a, b)]
            diffs.append(f"{key}: {shown[0]} in file vs {shown[1]} now")
    return diffs


class FeatureWriter:
    """Append images to a feature file; resumable and safe against being killed at any moment.

    Images are buffered and committed as one part file when `commit_bytes` of features are waiting or on
    `flush()`; a kill loses at most the uncommitted images (the extractor redoes them: `done_ids`).
    Re-adding an id already in `done_ids` is ignored (`add_*` returns False), so a resumed extractor may
    simply replay its image list. On an existing file whose provenance differs the writer refuses, unless
    `overwrite=True`: then the old file stays intact and readable until the new run's first commit replaces
    it atomically (no delete-then-recreate window). `close()` consolidates the parts into one plain file
    unless `consolidate=False` (that copies the data once; skip it for very large files).

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
        consolidate: bool = True,
        lock_timeout: float | None = 0.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        dtype = np.dtype(dtype).name
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.path = Path(path)
        self.kind = kind
        self.dtype = dtype
        self.commit_bytes = int(commit_bytes)
        self.consolidate = consolidate
        self.provenance = _normalise_provenance(provenance, kind, dtype)
        self._parts = _parts_dir(self.path)
        self._lock_file = self._lock(lock_timeout)
        self._closed = False
        try:
            self._open(overwrite)
        except BaseException:
            self._release()
            raise

    def _open(self, overwrite: bool) -> None:
        self._buffer: list[tuple[int, tuple[int, int], tuple[int, ...], dict[str, np.ndarray]]] = []
        self._buffer_bytes = 0
        # A consolidated existing file's data becomes part 0 (by hard link) at the first commit.
        self._base_rows = 0
        self._dropped_parts = False
        old = self._existing_index(overwrite)
        # overwrite: the old file stays until the first commit (flush / close) replaces it
        self._stale = old is None and self.path.exists()
        if old is not None:
            self._index = old
            self._base_rows = 0 if old.parts else old.total_rows
        else:
            self._index = _Index(kind=self.kind, provenance=self.provenance, feature_dim=0)
        self._done: set[int] = set(self._index.image_ids)
        self._remove_leftovers(keep=self._referenced_on_disk)
        if not self.path.exists() or self._dropped_parts:
            # a new file exists (empty, with its provenance) from the start; readers of a file with a
            # damaged part can read the rest again at once
            self._commit_index()

    # -- opening ---------------------------------------------------------------------------------
    def _lock(self, timeout: float | None) -> Any:
        """The exclusive lock on <file>.parts/writer.lock (an open file: closing it releases the lock)."""
        if fcntl is None:  # pragma: no cover
            raise GridVQAError(f"{self.path}: writing feature files needs POSIX file locks (fcntl)")
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        lock_path = self._parts / _LOCK_NAME
        while True:
            try:
                self._parts.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except (FileNotFoundError, FileExistsError):
                # the last writer removed the folder just now (mkdir saw it, is_dir() did not)
                if self._parts.exists() and not self._parts.is_dir():
                    raise DataError(f"{self.path}: {self._parts} is in the way (not a folder)") from None
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

    def _existing_index(self, overwrite: bool) -> _Index | None:
        self._referenced_on_disk: set[str] = set()
        if not self.path.exists():
            return None
        try:
            old = _load_index(self.path, keep_damaged=True)
        except _Unreadable as e:
            if overwrite:
                return None
            raise DataError(f"{e}; pass overwrite=True to start afresh") from None
        except DataError:
            if overwrite:
                return None
            raise
        self._referenced_on_disk = {name for name, _ in old.parts}
        if overwrite:
            return None
        diffs = _provenance_diff(old.provenance, self.provenance)
        if diffs:
            raise DataError(
                f"{self.path}: written with different provenance ({'; '.join(diffs)}); "
                "pass overwrite=True to start afresh"
            )
        if old.damaged:
            if all(why == "missing" for why in old.damaged.values()) and len(old.damaged) == len(old.parts):
                raise DataError(
                    f"{self.path}: its part files are missing from {self._parts} (move the folder with "
                    "the file, or pass overwrite=True to start afresh)"
                )
            old = self._drop_damaged(old)
        return old

    def _drop_damaged(self, old: _Index) -> _Index:
        starts = np.cumsum([0] + [n for _, n in old.parts])[:-1].tolist()
        per_part = dict.fromkeys(old.damaged, 0)
        names = [name for name, _ in old.parts]
        for o in old.offset:
            name = names[bisect.bisect_right(starts, o) - 1]
            if name in per_part:
                per_part[name] += 1
        for name, why in old.damaged.items():
            log.warning(
                "%s: part file %s is %s; its %d image(s) are dropped and will be extracted again",
                self.path,
                self._parts / name,
                why if why == "missing" else f"damaged ({why})",
                per_part[name],
            )
        self._dropped_parts = True
        return _without_parts(old, set(old.damaged))

    def _remove_leftovers(self, keep: set[str]) -> None:
        """Temp files of killed runs and parts no committed index refers to (we hold the lock)."""
        for p in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            p.unlink(missing_ok=True)
        for p in self._parts.iterdir():
            if p.name.endswith(".tmp") or (p.name.startswith("part-") and p.name not in keep):
                p.unlink(missing_ok=True)

    # -- public state ----------------------------------------------------------------------------
    @property
    def done_ids(self) -> set[int]:
        """Ids committed or buffered (the live set: read it, do not modify it)."""
        return self._done

    @property
    def pending(self) -> int:
        """Images buffered and not yet committed (lost if the process dies now)."""
        return len(self._buffer)

    @property
    def feature_dim(self) -> int:
        return self._index.feature_dim

    def missing(self, expected_ids: Iterable[int]) -> list[int]:
        """The ids of `expected_ids` not yet done, in their order: what is left to extract."""
        return [int(i) for i in expected_ids if int(i) not in self._done]

    def is_complete(self, expected_ids: Iterable[int]) -> bool:
        return not self.missing(expected_ids)

    # -- adding ----------------------------------------------------------------------------------
    def _check_open(self, kind: str) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        if kind != self.kind:
            raise ValueError(f"{self.path}: this is a {self.kind} feature file; add_{kind} does not apply")

    def _cast_features(self, image_id: int, x: np.ndarray) -> np.ndarray:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{self.path}: image {image_id}: features must be floating point, got {x.dtype}")
        if self.dtype == "float16" and x.dtype != np.float16 and x.size and np.abs(x).max() > _FLOAT16_MAX:
            raise ValueError(f"{self.path}: image {image_id}: features overflow float16; use dtype='float32'")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _fix_fields(self, image_id: int, rows: dict[str, np.ndarray]) -> None:
        """The first image fixes C and the optional fields; later images must agree."""
        got = {name: (a.dtype, a.shape[1:]) for name, a in rows.items()}
        if self._index.fields is None:
            self._index.fields = got
            self._index.feature_dim = int(got["features"][1][0])
            return
        want = self._index.fields
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
        self._fix_fields(image_id, rows)
        self._buffer.append((image_id, (h, w), extent, rows))
        self._buffer_bytes += sum(a.nbytes for a in rows.values())
        self._done.add(image_id)
        if self._buffer_bytes >= self.commit_bytes:
            self.flush()

    def add_grid(self, image_id: int, grid: Any, image_size: Any) -> bool:
        """Add one image's res5 map `grid` [H, W, C] and its original (h, w); False if the id is done."""
        self._check_open("grid")
        image_id = operator.index(image_id)
        if image_id in self._done:
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
        self._check_open("region")
        image_id = operator.index(image_id)
        if image_id in self._done:
            return False
        feats = np.asarray(features)
        if feats.ndim != 2 or min(feats.shape) < 1:
            raise ValueError(
                f"{self.path}: image {image_id}: features must be [N, C], got shape {feats.shape}"
            )
        n = feats.shape[0]
        rows = {"features": self._cast_features(image_id, feats)}
        given = {
            "boxes": boxes,
            "labels": labels,
            "scores": scores,
            "attr_labels": attr_labels,
            "attr_scores": attr_scores,
        }
        for name, value in given.items():
            dtype = np.int32 if name.endswith("labels") else np.float32
            if value is None:
                if name in _OPTIONAL:
                    continue
                value = np.full(n, _fill(np.dtype(dtype)), dtype)
            a = np.asarray(value)
            if name.endswith("labels") and a.size and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{self.path}: image {image_id}: {name} must be integers, got {a.dtype}")
            want = (n, 4) if name == "boxes" else (n,) if name in ("labels", "scores") else None
            if (want is not None and a.shape != want) or (want is None and (a.ndim < 1 or a.shape[0] != n)):
                expected = want or (n, "...")
                msg = f"{name} has shape {a.shape}, expected {expected}"
                raise ValueError(f"{self.path}: image {image_id}: {msg}")
            rows[name] = np.ascontiguousarray(a, dtype=dtype)
        self._add(image_id, image_size, (n,), rows)
        return True

    # -- committing ------------------------------------------------------------------------------
    def _next_part(self) -> str:
        used = [int(p.name[5:11]) for p in self._parts.glob("part-??????*.h5") if p.name[5:11].isdigit()]
        used += [int(name[5:11]) for name, _ in self._index.parts]
        # the random tail: numbering restarts after a consolidation, names must not
        return f"part-{max(used, default=-1) + 1:06d}-{secrets.token_hex(4)}.h5"

    def _write_part(self) -> str:
        """The buffered images' rows as one new part file (written image by image: no concatenated copy)."""
        name = self._next_part()
        tmp = _tmp_path(self._parts, name)
        total = sum(len(b[3]["features"]) for b in self._buffer)
        with h5py.File(tmp, "w") as f:
            for key, first in self._buffer[0][3].items():
                ds = f.create_dataset(key, shape=(total, *first.shape[1:]), dtype=first.dtype)
                start = 0
                for *_, rows in self._buffer:
                    ds[start : start + len(rows[key])] = rows[key]
                    start += len(rows[key])
        _replace(tmp, self._parts / name)
        return name

    def _adopt_base(self) -> None:
        """Make a consolidated file's data part 0, by hard link (no copy) where the filesystem allows."""
        name = self._next_part()
        try:
            os.link(self.path, self._parts / name)
        except OSError:
            shutil.copyfile(self.path, self._parts / name)
        self._index.parts = [(name, self._base_rows)]
        self._base_rows = 0

    def flush(self) -> None:
        """Commit the buffered images now: after this returns they survive a kill."""
        if not self._buffer:
            if self._stale:
                self._commit_index()
            return
        if self._base_rows:
            self._adopt_base()
        idx = self._index
        name = self._write_part()
        offset = idx.total_rows
        for image_id, size, extent, r in self._buffer:
            idx.image_ids.append(image_id)
            idx.image_size.append(size)
            idx.offset.append(offset)
            idx.extent.append(extent)
            offset += len(r["features"])
        idx.parts.append((name, offset - idx.total_rows))
        idx.total_rows = offset
        self._buffer, self._buffer_bytes = [], 0
        self._commit_index()

    def _commit_index(self) -> None:
        tmp = _tmp_path(self.path.parent, self.path.name)
        self._write(tmp, consolidate=False)
        _replace(tmp, self.path)
        self._stale = False
        keep = {name for name, _ in self._index.parts}
        self._remove_leftovers(keep)  # parts of an overwritten file become garbage only now
        self._referenced_on_disk = keep

    def _write(self, dst: Path, consolidate: bool) -> None:
        idx = self._index
        fields = idx.fields or _default_fields(idx.kind, self.dtype, idx.feature_dim)
        with h5py.File(dst, "w") as f:
            _write_attrs(f, idx)
            _write_per_image(f, idx)
            for key, (dt, trailing) in fields.items():
                shape = (idx.total_rows, *trailing)
                if not idx.parts:
                    f.create_dataset(key, shape=shape, dtype=dt)
                elif consolidate:
                    self._copy_field(f.create_dataset(key, shape=shape, dtype=dt), key, trailing, dt)
                else:
                    layout = h5py.VirtualLayout(shape=shape, dtype=dt)
                    start = 0
                    for name, n in idx.parts:
                        src = h5py.VirtualSource(
                            f"{self._parts.name}/{name}", key, shape=(n, *trailing), dtype=dt
                        )
                        layout[start : start + n] = src
                        start += n
                    # a missing part then reads as NaN / -1, not as plausible zeros
                    f.create_virtual_dataset(key, layout, fillvalue=_fill(dt))
            if idx.parts and not consolidate:
                f.create_dataset("part_files", data=[n for n, _ in idx.parts], dtype=h5py.string_dtype())
                f.create_dataset("part_rows", data=np.asarray([r for _, r in idx.parts], np.int64))

    def _copy_field(self, out: h5py.Dataset, key: str, trailing: tuple[int, ...], dt: np.dtype) -> None:
        block = max(1, _COPY_BLOCK_BYTES // max(1, dt.itemsize * int(np.prod(trailing, dtype=np.int64))))
        start = 0
        for name, n in self._index.parts:
            try:
                with h5py.File(self._parts / name, "r") as src:
                    for i in range(0, n, block):
                        j = min(n, i + block)
                        out[start + i : start + j] = src[key][i:j]
            except (OSError, KeyError) as e:  # damaged since the writer opened the file
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(
                    f"{self.path}: part file {self._parts / name} is damaged ({why}); the file is left "
                    "unconsolidated: open a writer again to redo its images"
                ) from None
            start += n

    def close(self, consolidate: bool | None = None) -> Path:
        """Commit what is buffered, consolidate (default: the constructor's choice), release the lock."""
        if self._closed:
            return self.path
        try:
            self.flush()
            if (self.consolidate if consolidate is None else consolidate) and self._index.parts:
                tmp = _tmp_path(self.path.parent, self.path.name)
                try:
                    self._write(tmp, consolidate=True)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                _replace(tmp, self.path)
                self._index.parts = []
                self._remove_leftovers(keep=set())
        finally:
            self._release()
        return self.path

    def _release(self) -> None:
        """Remove the parts folder when nothing but the lock is left in it, then drop the lock.

        Both removals happen while the lock is held; a writer waiting on the removed lock file sees that
        it is gone once it gets the lock, and starts over (see `_lock`).
        """
        self._closed = True
        try:
            if not any(p.name != _LOCK_NAME for p in self._parts.iterdir()):
                (self._parts / _LOCK_NAME).unlink()
                try:
                    self._parts.rmdir()
                except OSError:  # the next writer already put its lock file there
                    pass
        except OSError:  # someone removed the folder under us: nothing left to tidy
            pass
        finally:
            self._lock_file.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an error the buffered images are still complete: keep them, but leave consolidation for later.
        self.close(consolidate=None if exc_type is None else False)


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
            time.sleep(min(_LOCK_POLL_S, left))


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
        index = _load_index(self.path)
        if index.kind != self.kind:
            raise DataError(f"{self.path}: a {index.kind} feature file, expected {self.kind}")
        self._index = index
        self._row = {image_id: i for i, image_id in enumerate(index.image_ids)}
        self._part_starts = np.cumsum([0] + [n for _, n in index.parts])[:-1].tolist()

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
            path = self.path if name == "" else _parts_dir(self.path) / name
            h = h5py.File(path, "r")
            if name == "" and _identity(path) != self._index.identity:
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
        for attempt in range(3):
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
                if attempt == 2:
                    why = str(e).splitlines()[0] if str(e) else "it keeps changing"
                    raise DataError(f"{self.path}: cannot read image {image_id} ({why})") from None
                self.close()
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
        names = [n for n in _ROW_FIELDS["region"] if n in (self._index.fields or {})]
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
