"""The on-disk layout of a feature file: names, constants, the in-memory index and how it is written."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gridvqa import __version__

FORMAT = "gridvqa-features"
FORMAT_VERSION = 1
KINDS = ("grid", "region")
DTYPES = ("float16", "float32")
RESERVED = {"format", "format_version", "feature_dim", "provenance_json"}
PER_IMAGE = {"grid": "grid_shape", "region": "num_boxes"}  # the dataset giving each image's extent
ROW_FIELDS = {
    "grid": ("features",),
    "region": ("features", "boxes", "labels", "scores", "attr_labels", "attr_scores"),
}
OPTIONAL = ("attr_labels", "attr_scores")
FLOAT16_MAX = float(np.finfo(np.float16).max)

Fields = dict[str, tuple[np.dtype, tuple[int, ...]]]  # row dataset -> (dtype, shape after the row axis)


@dataclass
class Index:
    """Everything a file says except the per-row arrays themselves."""

    kind: str
    provenance: dict[str, Any]
    feature_dim: int
    image_ids: list[int] = field(default_factory=list)
    image_size: list[tuple[int, int]] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    extent: list[tuple[int, ...]] = field(default_factory=list)  # (H, W) per grid image, (n,) per region
    fields: Fields | None = None  # None until the first image
    parts: list[tuple[str, int]] = field(default_factory=list)  # (file name in <file>.parts, rows)
    total_rows: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # part name -> why it cannot be read
    identity: tuple[int, ...] | None = None  # identity() of the file this index was read from

    @property
    def dtype(self) -> str:
        return self.provenance["dtype"]

    def part_starts(self) -> list[int]:
        """The first row of each part."""
        return np.cumsum([0] + [n for _, n in self.parts])[:-1].tolist()


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def fill_value(dtype: np.dtype) -> Any:
    """What a row nobody wrote reads as: NaN / -1, never plausible zeros."""
    return np.nan if np.issubdtype(dtype, np.floating) else -1


def default_fields(kind: str, dtype: str, feature_dim: int) -> Fields:
    fields = {"features": (np.dtype(dtype), (feature_dim,))}
    if kind == "region":
        fields.update(
            boxes=(np.dtype(np.float32), (4,)),
            labels=(np.dtype(np.int32), ()),
            scores=(np.dtype(np.float32), ()),
        )
    return fields


def normalise_provenance(provenance: Mapping[str, Any], kind: str, dtype: str) -> dict[str, Any]:
    ours = {"kind": kind, "dtype": dtype, "code_version": __version__}
    prov: dict[str, Any] = {}
    for key, value in provenance.items():
        if not isinstance(key, str) or not key or key in RESERVED:
            raise ValueError(f"provenance key {key!r} is not allowed (reserved: {sorted(RESERVED)})")
        if key in ours and value != ours[key]:
            raise ValueError(f"provenance[{key!r}] = {value!r} contradicts the writer's {key}={ours[key]!r}")
        try:  # round-trip so tuples/lists and the file's JSON compare equal
            prov[key] = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"provenance[{key!r}] is not JSON-serialisable: {e}") from None
    prov.update(ours)
    return prov


def provenance_diff(old: Mapping[str, Any], new: Mapping[str, Any], where: tuple[str, str]) -> list[str]:
    """`key: <old> in <where[0]> vs <new> <where[1]>` for each key whose value differs."""
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            shown = ["<absent>" if v is missing else repr(v) for v in (a, b)]
            diffs.append(f"{key}: {shown[0]} {where[0]} vs {shown[1]} {where[1]}")
    return diffs


def write_attrs(f: h5py.File, index: Index) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["feature_dim"] = index.feature_dim
    f.attrs["provenance_json"] = json.dumps(index.provenance, sort_keys=True)
    for key, value in index.provenance.items():
        scalar = isinstance(value, (str, bool, float)) or (isinstance(value, int) and abs(value) < 2**63)
        f.attrs[key] = value if scalar else json.dumps(value, sort_keys=True)


def write_per_image(f: h5py.File, index: Index) -> None:
    n = len(index.image_ids)
    f.create_dataset("image_ids", data=np.asarray(index.image_ids, np.int64).reshape(n))
    f.create_dataset("image_size", data=np.asarray(index.image_size, np.int32).reshape(n, 2))
    f.create_dataset("offset", data=np.asarray(index.offset, np.int64).reshape(n))
    extent = np.asarray(index.extent, np.int32)
    if index.kind == "grid":
        f.create_dataset("grid_shape", data=extent.reshape(n, 2))
    else:
        f.create_dataset("num_boxes", data=extent.reshape(n))


def write_part_index(f: h5py.File, index: Index, parts_folder: str) -> None:
    """The row datasets as virtual datasets over the part files, and the part list (unconsolidated form)."""
    fields = index.fields or default_fields(index.kind, index.dtype, index.feature_dim)
    for key, (dt, trailing) in fields.items():
        shape = (index.total_rows, *trailing)
        if not index.parts:
            f.create_dataset(key, shape=shape, dtype=dt)
            continue
        layout = h5py.VirtualLayout(shape=shape, dtype=dt)
        start = 0
        for name, n in index.parts:
            layout[start : start + n] = h5py.VirtualSource(
                f"{parts_folder}/{name}", key, shape=(n, *trailing), dtype=dt
            )
            start += n
        # a missing part then reads as NaN / -1, not as plausible zeros
        f.create_virtual_dataset(key, layout, fillvalue=fill_value(dt))
    if index.parts:
        f.create_dataset("part_files", data=[n for n, _ in index.parts], dtype=h5py.string_dtype())
        f.create_dataset("part_rows", data=np.asarray([r for _, r in index.parts], np.int64))
