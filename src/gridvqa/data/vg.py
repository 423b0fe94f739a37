"""Visual Genome reader: boxes, object labels and attribute labels through the vocabulary files.

Reads the official `image_data.json` and `attributes.json` (or `objects.json` when attributes are
not wanted) and the bottom-up-attention vocabulary files (`objects_vocab.txt`,
`attributes_vocab.txt`: one class per line, synonyms separated by commas).

Names are cleaned as bottom-up-attention's `data/genome/setup_vg.py` does before it looks them up:
an object is named by its first name only, lower-cased, stripped, without a trailing period; a
multi-word name whose leading words are all common colour / size / material words becomes its last
word plus those words as attributes ("white plate" -> plate + white); an attribute string is split
on " and " ("black and white" stays whole).

Boxes are clipped to the image; a box with a coordinate that is not a finite number, or one left
empty by the clipping, is dropped and counted (`VGStats`), never handed to training.

Label conventions (torchvision's): object labels are 1..num_classes with 0 = background;
attribute labels are 0..num_attributes-1, up to `max_attributes` per box, padded with -1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from gridvqa.data import layout
from gridvqa.data.jsonio import load_json
from gridvqa.errors import DataError

MAX_ATTRIBUTES = 16
# bottom-up-attention data/genome/setup_vg.py `common_attributes`: leading words of an object name
# that are taken as its attributes.
COMMON_ATTRIBUTES = frozenset({
    "white", "black", "blue", "green", "red", "brown", "yellow", "small", "large", "silver", "wooden",
    "orange", "gray", "grey", "metal", "pink", "tall", "long", "dark",
})


def clean_string(text: str) -> str:
    """setup_vg.py `clean_string`: lower-case, strip, drop one trailing period."""
    text = text.lower().strip()
    if text.endswith("."):
        return text[:-1].strip()
    return text


def clean_object_name(name: str) -> tuple[str, list[str]]:
    """setup_vg.py `clean_objects`: (object name, attributes taken from its leading words)."""
    text = clean_string(name)
    words = text.split()
    if len(words) > 1 and all(w in COMMON_ATTRIBUTES for w in words[:-1]):
        return words[-1], words[:-1]
    return text, []


def clean_attribute(text: str) -> list[str]:
    """setup_vg.py `clean_attributes`: one attribute string -> attributes ("red and blue" -> red, blue)."""
    text = clean_string(text)
    if text == "black and white":
        return [text]
    return [w.lower().strip() for w in text.split(" and ")]


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


def read_split_file(path: str | os.PathLike) -> list[int]:
    """Image ids of a split list: bottom-up-attention's `VG_100K_2/2415417.jpg xml/2415417.xml` lines
    (data/genome/{train,val,test}.txt) or one image id per line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: Visual Genome split file not found")
    ids: list[int] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        first = line.split()[0] if line.strip() else ""
        if not first:
            continue
        stem = Path(first).stem
        if not stem.isdigit():
            raise DataError(f"{p}: line {n} ({line.strip()[:60]!r}) is neither an image id nor a "
                            f"VG_100K*/<id>.jpg path")
        ids.append(int(stem))
    if not ids:
        raise DataError(f"{p}: empty Visual Genome split file")
    return ids


def box_from_object(obj: dict) -> tuple[float, float, float, float] | None:
    """(x, y, w, h) of a VG object as floats, or None when a coordinate is missing or not a finite number."""
    try:
        vals = tuple(float(obj[k]) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in vals):
        return None
    return vals  # type: ignore[return-value]


def image_folder(url: object) -> str | None:
    """VG_100K or VG_100K_2, as the image's url in image_data.json says (None when it says neither)."""
    if not isinstance(url, str):
        return None
    parts = url.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] in layout.VG_IMAGE_DIRS else None


@dataclass
class VGRecord:
    image_id: int
    width: int
    height: int
    coco_id: int | None
    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2 in pixels
    labels: np.ndarray  # [N] int64, 1..num_classes
    attributes: np.ndarray  # [N, MAX_ATTRIBUTES] int64, -1 padded


_DROP_REASONS = {
    "dropped_unknown_class": "boxes dropped: object name not in the object vocabulary",
    "dropped_bad_coordinates": "boxes dropped: a coordinate missing or not a finite number",
    "dropped_degenerate": "boxes dropped: empty once clipped to the image",
    "unknown_attributes": "attribute labels dropped: not in the attribute vocabulary",
    "images_without_boxes": "images dropped: no box left",
    "images_not_in_split": "images dropped: in no split file",
    "images_excluded": "images dropped: COCO twin excluded (data.exclude_vqa_val)",
}


@dataclass
class VGStats:
    """What was read, and what was left out and why (`summary_lines` says it in words); box counts
    are over every image read, before split files or exclusions choose among them."""

    images: int = 0
    boxes: int = 0
    dropped_unknown_class: int = 0
    dropped_bad_coordinates: int = 0
    dropped_degenerate: int = 0
    unknown_attributes: int = 0
    images_without_boxes: int = 0
    images_not_in_split: int = 0
    images_excluded: int = 0


    def summary_lines(self) -> list[str]:
        """One line per reason something was left out (reasons with a zero count are not listed)."""
        head = f"Visual Genome: {self.images} images, {self.boxes} boxes"
        return [head] + [f"Visual Genome: {getattr(self, k)} {why}" for k, why in _DROP_REASONS.items()
                         if getattr(self, k)]

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
        meta_path = self.dir / "image_data.json"
        meta = load_json(meta_path, "Visual Genome image_data.json")
        if not isinstance(meta, list):
            raise DataError(f"{meta_path}: expected a json list of images")
        sizes: dict[int, tuple[int, int, object]] = {}
        self._folders: dict[int, str] = {}
        for i, m in enumerate(meta):
            try:
                iid = int(m.get("image_id", m.get("id", -1)))
                sizes[iid] = (int(m["width"]), int(m["height"]), m.get("coco_id"))
            except (AttributeError, KeyError, TypeError, ValueError):
                raise DataError(f"{meta_path}: image #{i} lacks an integer image_id, width or "
                                "height") from None
            folder = image_folder(m.get("url"))
            if folder is not None:
                self._folders[iid] = folder
        ann_file = self.dir / ("attributes.json" if with_attributes else "objects.json")
        anns = load_json(ann_file, f"Visual Genome {ann_file.name}")
        if not isinstance(anns, list):
            raise DataError(f"{ann_file}: expected a json list of images")
        self.records: list[VGRecord] = []
        for entry in anns:
            iid = int(entry.get("image_id", entry.get("id", -1)))
            if iid not in sizes:
                raise DataError(f"{ann_file}: image_id {iid} is not in image_data.json")
            objs = entry.get("attributes" if with_attributes else "objects") or []
            rec = self._record(iid, sizes[iid], objs, with_attributes)
            if len(rec.labels) >= min_boxes:
                self.records.append(rec)
            else:
                self.stats.images_without_boxes += 1
        self.stats.images = len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def image_path(self, image_id: int) -> Path:
        """Real VG spreads its images over VG_100K and VG_100K_2; image_data.json's url says which."""
        name = f"{int(image_id)}.jpg"
        said = self._folders.get(int(image_id))
        if said is not None and (self.dir / said / name).exists():
            return self.dir / said / name
        for d in layout.VG_IMAGE_DIRS:
            p = self.dir / d / name
            if p.exists():
                return p
        return self.dir / (said or layout.VG_IMAGE_DIRS[0]) / name

    def _record(self, iid: int, size: tuple, objs: list[dict], with_attributes: bool) -> VGRecord:
        w, h, coco_id = size
        boxes, labels, attrs = [], [], []
        for o in objs:
            names = o.get("names") or ([o["name"]] if "name" in o else [])
            name, name_attrs = clean_object_name(str(names[0])) if names else ("", [])
            label = self._class_lookup.get(name)
            if label is None:
                self.stats.dropped_unknown_class += 1
                continue
            xywh = box_from_object(o)
            if xywh is None:
                self.stats.dropped_bad_coordinates += 1
                continue
            x1, y1 = max(xywh[0], 0.0), max(xywh[1], 0.0)
            x2, y2 = min(xywh[0] + xywh[2], float(w)), min(xywh[1] + xywh[3], float(h))
            if x2 <= x1 or y2 <= y1:
                self.stats.dropped_degenerate += 1
                continue
            a = self._attribute_ids(name_attrs + _raw_attributes(o)) if with_attributes else []
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

    def _attribute_ids(self, names: Iterable[str]) -> list[int]:
        out: list[int] = []
        for name in names:
            idx = self._attr_lookup.get(name)
            if idx is None:
                self.stats.unknown_attributes += 1
            elif idx not in out:
                out.append(idx)
        return out

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> VGRecord:
        return self.records[i]

    def exclude_coco_ids(self, coco_ids: set[int]) -> None:
        """Drop images whose COCO twin is in `coco_ids` (e.g. VQA val images, so that VQA val scores come
        from images the detector never saw; an option of ours, not part of the reference recipe)."""
        kept = [r for r in self.records if r.coco_id is None or r.coco_id not in coco_ids]
        self.stats.images_excluded += len(self.records) - len(kept)
        self.records = kept
        self.stats.images = len(kept)
        self.stats.boxes = sum(len(r.labels) for r in kept)

    def keep_image_ids(self, image_ids: set[int]) -> None:
        """Keep only the images listed (the split files'); the others are counted as in no split."""
        kept = [r for r in self.records if r.image_id in image_ids]
        self.stats.images_not_in_split += len(self.records) - len(kept)
        self.records = kept
        self.stats.images = len(kept)
        self.stats.boxes = sum(len(r.labels) for r in kept)


def _raw_attributes(obj: dict) -> list[str]:
    """An object's attribute strings, each cleaned and split as setup_vg.py does."""
    raw = obj.get("attributes") or []
    if isinstance(raw, str):
        raw = [raw]
    out: list[str] = []
    for a in raw:
        out += clean_attribute(str(a))
    return out
