"""Reading and checking a feature file's index (attributes, per-image datasets, part list, part files)."""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gridvqa.data.features.format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    PER_IMAGE,
    ROW_FIELDS,
    Fields,
    Index,
    parts_dir,
)
from gridvqa.errors import DataError


class Unreadable(DataError):
    """The file is ours or meant to be, but cannot be read (truncated, damaged): starting afresh fixes it."""


def identity(path: Path) -> tuple[int, ...] | None:
    """Tells a replaced file from the one read before (an inode number alone may be reused at once)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_index(path: Path, *, keep_damaged: bool = False) -> Index:
    """Read and check a feature file's attributes and per-image datasets, and open each part file.

    A missing or damaged part raises DataError naming it, unless `keep_damaged` (the writer, which holds
    the lock and drops those images): then `Index.damaged` lists them.
    """
    for _ in range(5):
        index = _load_index_once(path)
        if index.identity is None:  # replaced while being opened
            continue
        if not index.damaged or keep_damaged:
            return index
        # A writer consolidating right now removes parts just after replacing the file: read it again.
        if identity(path) != index.identity:
            continue
        name, why = next(iter(index.damaged.items()))
        part = parts_dir(path) / name
        if why == "missing":
            raise DataError(f"{path}: part file {part} is missing (move it with the file)")
        raise DataError(
            f"{path}: part file {part} is damaged ({why}); run the extraction again to redo its images"
        )
    raise DataError(f"{path}: the file keeps changing while being opened")


def part_problem(part: Path, rows: int, fields: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> str | None:
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
        return f"not a readable HDF5 file: {first_line(e)}"
    return None


def _load_index_once(path: Path) -> Index:
    """One attempt; `identity` is None in the result when the file was replaced while being opened."""
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    before = identity(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if identity(path) != before:  # replaced while being opened
            return Index(kind="grid", provenance={}, feature_dim=0)
        raise Unreadable(f"{path}: not a readable HDF5 file ({first_line(e)})") from None
    still = identity(path) == before
    with f:
        _check_format(path, f)
        try:
            raw = _read_raw(f)
        except (KeyError, ValueError, TypeError, OSError, json.JSONDecodeError) as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise Unreadable(f"{path}: malformed feature file ({type(e).__name__}: {msg})") from None
    index = _checked_index(path, raw)
    index.identity = before if still else None
    index.damaged = {
        name: why
        for name, r in index.parts
        if (why := part_problem(parts_dir(path) / name, r, raw["fields"])) is not None
    }
    return index


def _check_format(path: Path, f: h5py.File) -> None:
    if f.attrs.get("format") != FORMAT:
        raise DataError(f"{path}: not a gridvqa feature file (no format={FORMAT!r} attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: feature format version {version}, this code reads {FORMAT_VERSION}")


def _read_raw(f: h5py.File) -> dict[str, Any]:
    """The index datasets as they are (KeyError / ValueError / ... when one is missing or wrong)."""
    prov = json.loads(f.attrs["provenance_json"])
    kind = prov["kind"]
    if kind not in KINDS or prov.get("dtype") not in DTYPES:
        raise ValueError(f"kind {kind!r} / dtype {prov.get('dtype')!r}")
    fields = {name: (f[name].dtype, tuple(f[name].shape[1:])) for name in ROW_FIELDS[kind] if name in f}
    parts: list[tuple[str, int]] = []
    if "part_files" in f:
        parts = list(zip(f["part_files"].asstr()[:], map(int, f["part_rows"][:]), strict=True))
    return {
        "prov": prov,
        "kind": kind,
        "ids": f["image_ids"][:].astype(np.int64),
        "size": f["image_size"][:],
        "offset": f["offset"][:].astype(np.int64),
        "extent": f[PER_IMAGE[kind]][:].astype(np.int64),
        "fields": fields,
        "rows": {f[name].shape[0] for name in fields},
        "parts": parts,
    }


def _checked_index(path: Path, raw: dict[str, Any]) -> Index:
    """The Index of `raw`, after checking that its datasets agree with one another."""
    kind, fields, ids, offset = raw["kind"], raw["fields"], raw["ids"], raw["offset"]
    extent = raw["extent"][:, None] if raw["extent"].ndim == 1 else raw["extent"]
    n = len(ids)
    lengths_ok = len(raw["size"]) == n and len(offset) == n and len(extent) == n and len(raw["rows"]) == 1
    needed = {"features"} | ({"boxes", "labels", "scores"} if kind == "region" else set())
    if not lengths_ok or needed - set(fields):
        raise Unreadable(f"{path}: malformed feature file (per-image or per-row datasets disagree in length)")
    total = next(iter(raw["rows"]))
    counts = np.prod(extent, axis=1) if n else np.zeros(0, np.int64)
    if n and (offset.min() < 0 or (offset + counts).max() > total or counts.min() < 1):
        raise Unreadable(f"{path}: malformed feature file (an image's rows fall outside the {total} rows)")
    if len(set(ids.tolist())) != n:
        raise Unreadable(f"{path}: malformed feature file (duplicate image ids)")
    if raw["parts"] and sum(r for _, r in raw["parts"]) != total:
        raise Unreadable(f"{path}: malformed feature file (part_rows do not add up to {total} rows)")
    return Index(
        kind=kind,
        provenance=raw["prov"],
        feature_dim=int(fields["features"][1][0]) if fields["features"][1] else 0,
        image_ids=ids.tolist(),
        image_size=[(int(h), int(w)) for h, w in raw["size"]],
        offset=offset.tolist(),
        extent=[tuple(int(v) for v in e) for e in extent],
        fields=fields if n else None,  # an empty file has not fixed C or the attribute fields yet
        parts=raw["parts"],
        total_rows=total,
    )


def part_of_each_image(index: Index) -> list[int]:
    """The position in `index.parts` of the part holding each image (an image never spans two)."""
    starts = index.part_starts()
    return [bisect.bisect_right(starts, o) - 1 for o in index.offset]


def without_parts(index: Index, drop: set[str]) -> Index:
    """`index` less the parts in `drop` and the images stored in them."""
    shift, removed, parts = [], 0, []
    for name, n in index.parts:
        shift.append(removed)
        if name in drop:
            removed += n
        else:
            parts.append((name, n))
    out = Index(kind=index.kind, provenance=index.provenance, feature_dim=index.feature_dim, parts=parts)
    for i, k in enumerate(part_of_each_image(index)):
        if index.parts[k][0] in drop:
            continue
        out.image_ids.append(index.image_ids[i])
        out.image_size.append(index.image_size[i])
        out.offset.append(index.offset[i] - shift[k])
        out.extent.append(index.extent[i])
    out.total_rows = index.total_rows - removed
    if out.image_ids:
        out.fields = index.fields
    else:  # like a new file: the next image fixes C and the optional fields again
        out.feature_dim = 0
    return out


def check_fields(fields: Fields | None, want: Fields | None) -> str | None:
    """How `fields` differ from `want` (None when they agree or either file holds no image yet)."""
    if fields is None or want is None or fields == want:
        return None
    for name in sorted(set(fields) | set(want)):
        if name not in fields or name not in want:
            return f"{'has' if name in fields else 'has no'} {name}"
        if fields[name] != want[name]:
            (dt, trailing), (wdt, wtrailing) = fields[name], want[name]
            return f"{name} rows are {dt} {trailing}, not {wdt} {wtrailing}"
    return None
