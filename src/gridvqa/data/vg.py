"""Visual Genome reader: boxes, object labels and attribute labels through the vocabulary files.

Reads the official `image_data.json` and `attributes.json` (or `objects.json` when attributes are
not wanted) and the bottom-up-attention vocabulary files (`objects_vocab.txt`,
`attributes_vocab.txt`: one class per line, synonyms separated by commas).

Label conventions (torchvision's): object labels are 1..num_classes with 0 = background;
attribute labels are 0..num_attributes-1, up to `max_attributes` per box, padded with -1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gridvqa.data import layout
from gridvqa.data.jsonio import load_json
from gridvqa.errors import DataError

MAX_ATTRIBUTES = 16


def read_vocab(path: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """(class names, synonym -> 0-based index) from a one-class-per-line vocabulary file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: Visual Genome vocabulary file not found")
    names: list[str] = []
    lookup: dict[str, int] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        syns = [s.strip().lower() for s in line.split(",") if s.strip()]
        if not syns:
            continue
        idx = len(names)
        names.append(syns[0])
        for s in syns:
            lookup.setdefault(s, idx)
    if not names:
        raise DataError(f"{p}: empty vocabulary file")
    return names, lookup


@dataclass
class VGRecord:
    image_id: int
    width: int
    height: int
    coco_id: int | None
    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2 in pixels
    labels: np.ndarray  # [N] int64, 1..num_classes
    attributes: np.ndarray  # [N, MAX_ATTRIBUTES] int64, -1 padded


@dataclass
class VGStats:
    images: int = 0
    boxes: int = 0
    dropped_unknown_class: int = 0
    dropped_degenerate: int = 0
    unknown_attributes: int = 0


class VisualGenome:
    """All annotated images of a Visual Genome folder, filtered to the vocabulary."""

    def __init__(
        self,
        vg_dir: str | os.PathLike,
        objects_vocab: str | os.PathLike | None = None,
        attributes_vocab: str | os.PathLike | None = None,
        with_attributes: bool = True,
        max_attributes: int = MAX_ATTRIBUTES,
        min_boxes: int = 1,
    ) -> None:
        self.dir = Path(vg_dir)
        self.classes, self._class_lookup = read_vocab(objects_vocab or self.dir / "objects_vocab.txt")
        attr_vocab = attributes_vocab or self.dir / "attributes_vocab.txt"
        self.attribute_names, self._attr_lookup = read_vocab(attr_vocab)
        self.max_attributes = max_attributes
        self.stats = VGStats()
        meta = load_json(self.dir / "image_data.json", "Visual Genome image_data.json")
        sizes = {}
        for m in meta:
            iid = int(m.get("image_id", m.get("id", -1)))
            sizes[iid] = (int(m["width"]), int(m["height"]), m.get("coco_id"))
        ann_file = self.dir / ("attributes.json" if with_attributes else "objects.json")
        anns = load_json(ann_file, f"Visual Genome {ann_file.name}")
        self.records: list[VGRecord] = []
        for entry in anns:
            iid = int(entry.get("image_id", entry.get("id", -1)))
            if iid not in sizes:
                raise DataError(f"{ann_file}: image_id {iid} is not in image_data.json")
            objs = entry.get("attributes" if with_attributes else "objects") or []
            rec = self._record(iid, sizes[iid], objs, with_attributes)
            if len(rec.labels) >= min_boxes:
                self.records.append(rec)
        self.stats.images = len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def image_path(self, image_id: int) -> Path:
        """Real VG spreads its images over VG_100K and VG_100K_2."""
        for d in layout.VG_IMAGE_DIRS:
            p = self.dir / d / f"{int(image_id)}.jpg"
            if p.exists():
                return p
        return self.dir / layout.VG_IMAGE_DIRS[0] / f"{int(image_id)}.jpg"

    def _record(self, iid: int, size: tuple, objs: list[dict], with_attributes: bool) -> VGRecord:
        w, h, coco_id = size
        boxes, labels, attrs = [], [], []
        for o in objs:
            names = o.get("names") or ([o["name"]] if "name" in o else [])
            keys = [n.strip().lower() for n in names]
            label = next((self._class_lookup[k] for k in keys if k in self._class_lookup), None)
            if label is None:
                self.stats.dropped_unknown_class += 1
                continue
            x1, y1 = float(o["x"]), float(o["y"])
            x2, y2 = min(x1 + float(o["w"]), w), min(y1 + float(o["h"]), h)
            x1, y1 = max(x1, 0.0), max(y1, 0.0)
            if x2 <= x1 or y2 <= y1:
                self.stats.dropped_degenerate += 1
                continue
            a = []
            for name in (o.get("attributes") or []) if with_attributes else []:
                idx = self._attr_lookup.get(str(name).strip().lower())
                if idx is None:
                    self.stats.unknown_attributes += 1
                elif idx not in a:
                    a.append(idx)
            a = a[: self.max_attributes] + [-1] * (self.max_attributes - min(len(a), self.max_attributes))
            boxes.append((x1, y1, x2, y2))
            labels.append(label + 1)
            attrs.append(a)
        self.stats.boxes += len(labels)
        return VGRecord(
            image_id=iid,
            width=w,
            height=h,
            coco_id=None if coco_id is None else int(coco_id),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
            attributes=np.asarray(attrs, dtype=np.int64).reshape(-1, self.max_attributes),
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> VGRecord:
        return self.records[i]

    def exclude_coco_ids(self, coco_ids: set[int]) -> None:
        """Drop images whose COCO twin is in `coco_ids` (keep VQA val images out of pre-training)."""
        self.records = [r for r in self.records if r.coco_id is None or r.coco_id not in coco_ids]
