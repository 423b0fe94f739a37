"""The data set in the official formats: VQA v2 questions and annotations, COCO image folders, Visual
Genome image_data / objects / attributes json with their vocabularies, and stats.json."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gridvqa.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from gridvqa.data import layout
from gridvqa.data.jsonio import atomic_write_json
from gridvqa.data.synthetic.answers import WRONG_RATE, blind_prior, human_answers, majority_answer
from gridvqa.data.synthetic.objects import COLORS, SHAPES, SIZES
from gridvqa.data.synthetic.scenes import JPEG_QUALITY, Scene, make_scene, render
from gridvqa.data.synthetic.templates import FAMILIES, answer_vocabulary, question_type
from gridvqa.errors import DataError

SPLITS = ("train2014", "val2014", "test2015")
ANNOTATED = ("train2014", "val2014")


# ----------------------------------------------------------------------------------------------
# Writing the data set


def _info(split: str) -> dict[str, Any]:
    return {"description": "gridvqa synthetic shapes (VQA v2 format)", "version": "1.0", "year": 2024,
            "contributor": "gridvqa", "data_subtype": split}


LICENSE = {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


def _write_image(path: Path, data: bytes, vg_path: Path | None) -> None:
    atomic_write_bytes(path, data)
    if vg_path is not None:
        _link_or_write(path, vg_path, data)


class _Writer:
    """Image writes on a few threads: each atomic write waits on fsync, which would otherwise dominate."""

    def __init__(self, workers: int = 8, max_pending: int = 256) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending: list[Future] = []
        self.max_pending = max_pending

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        if len(self.pending) >= self.max_pending:
            self.drain()

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()  # re-raises the first write error here, in the caller's thread

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _link_or_write(src: Path, dst: Path, data: bytes) -> None:
    """VG image = the COCO file's pixels: hard link (no extra disk), or a copy where links fail."""
    try:
        with atomic_path(dst) as tmp:
            os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, data)


def _vg_entries(image_id: int, scene: Scene, boxes: Sequence[tuple[int, int, int, int]],
                first_object_id: int) -> tuple[dict, dict, dict]:
    """image_data, objects and attributes records of one image (VG image_id == COCO id)."""
    meta = {"image_id": image_id, "width": scene.width, "height": scene.height, "coco_id": image_id,
            "flickr_id": None, "url": f"{layout.VG_IMAGE_DIRS[0]}/{image_id}.jpg"}
    objs, attrs = [], []
    for k, (o, (x, y, bw, bh)) in enumerate(zip(scene.objs, boxes, strict=True)):
        box = {"object_id": first_object_id + k, "x": x, "y": y, "w": bw, "h": bh, "names": [o["shape"]],
               "synsets": []}
        objs.append(box)
        attrs.append({**box, "attributes": [o["color"], o["size"]]})
    return meta, {"image_id": image_id, "objects": objs}, {"image_id": image_id, "attributes": attrs}


def _check_args(counts: Sequence[int], seed: int, questions_per_image: int, min_side: int, max_side: int,
                max_objects: int) -> None:
    for name, v in zip(("train_images", "val_images", "test_images"), counts, strict=True):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 1 <= questions_per_image < 1000:  # question_id = image_id * 1000 + k
        raise ValueError(f"questions_per_image must be in 1..999, got {questions_per_image}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")


@dataclass
class _Params:
    """What a scene is drawn with (generate's arguments beyond the split sizes)."""

    seed: int
    questions_per_image: int
    min_side: int
    max_side: int
    max_objects: int


@dataclass
class _Build:
    """What generate() accumulates over the splits: VG records, the items the blind prior is scored on
    and the next free image and object ids (ids run on over the splits)."""

    root: Path
    params: _Params
    writer: _Writer
    vg_files: dict[str, list[dict]] = field(
        default_factory=lambda: {"image_data.json": [], "objects.json": [], "attributes.json": []}
    )
    blind_items: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in ANNOTATED})
    next_image_id: int = 1
    next_object_id: int = 1


@dataclass
class _Split:
    name: str
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # balanced per split
    questions: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    families: Counter = field(default_factory=Counter)
    objects: int = 0


def _add_image(b: _Build, sp: _Split, split_no: int, i: int) -> None:
    """The i-th image of a split: its scene, JPEG (written on the writer's threads), questions, answers
    and, for train2014, its Visual Genome records."""
    p = b.params
    image_id = b.next_image_id
    b.next_image_id += 1
    rng = np.random.default_rng([p.seed, split_no, i])  # per image: independent of the others
    scene = make_scene(rng, sp.counts, p.questions_per_image, p.min_side, p.max_side, p.max_objects)
    data, boxes = render(scene, rng)
    in_vg = sp.name == "train2014"
    vg_path = layout.vg_dir(b.root) / layout.VG_IMAGE_DIRS[0] / f"{image_id}.jpg" if in_vg else None
    b.writer.submit(_write_image, layout.coco_image_path(b.root, sp.name, image_id), data, vg_path)
    sp.objects += len(scene.objs)
    for k, q in enumerate(scene.questions):
        qid = image_id * 1000 + k
        sp.questions.append({"image_id": image_id, "question": q.text, "question_id": qid})
        sp.families[q.template.family] += 1
        answers = human_answers(q.answer, q.template.domain(q.params), rng)
        mc = majority_answer(answers)
        sp.annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": question_type(q.text),
            "answer_type": q.template.answer_type(q.params), "multiple_choice_answer": mc,
            "answers": answers,
        })
        if sp.name in b.blind_items:
            b.blind_items[sp.name].append({"family": q.template.family, "question": q.text,
                                           "multiple_choice_answer": mc,
                                           "answers": [a["answer"] for a in answers]})
    if in_vg:
        for name, rec in zip(b.vg_files, _vg_entries(image_id, scene, boxes, b.next_object_id), strict=True):
            b.vg_files[name].append(rec)
        b.next_object_id += len(scene.objs)


def _write_split(b: _Build, split_no: int, split: str, images: int) -> dict[str, Any]:
    """One split's images, questions and (train / val) annotations; returns its stats."""
    sp = _Split(split)
    for i in range(images):
        _add_image(b, sp, split_no, i)
    atomic_write_json(layout.questions_path(b.root, split), {
        "info": _info(split), "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
        "license": LICENSE, "questions": sp.questions})
    if split in ANNOTATED:
        atomic_write_json(layout.annotations_path(b.root, split), {
            "info": _info(split), "license": LICENSE, "data_subtype": split,
            "annotations": sp.annotations})
    return {"images": images, "questions": len(sp.questions), "objects": sp.objects,
            "questions_per_family": {f: sp.families[f] for f in FAMILIES},
            "annotated": split in ANNOTATED}


def _write_vg(b: _Build) -> None:
    vg = layout.vg_dir(b.root)
    for name, records in b.vg_files.items():
        atomic_write_json(vg / name, records)
    atomic_write_text(vg / "objects_vocab.txt", "\n".join(SHAPES) + "\n")
    atomic_write_text(vg / "attributes_vocab.txt", "\n".join(list(COLORS) + list(SIZES)) + "\n")


def _stats(b: _Build, split_stats: dict[str, Any]) -> dict[str, Any]:
    p, items = b.params, b.blind_items
    prior = blind_prior(items["train2014"], items["val2014"]) if items["val2014"] else {}
    return {
        "generator": "gridvqa.data.synthetic",
        "seed": p.seed,
        "params": {"questions_per_image": p.questions_per_image, "min_side": p.min_side,
                   "max_side": p.max_side, "max_objects": p.max_objects, "jpeg_quality": JPEG_QUALITY,
                   "wrong_answer_rate": WRONG_RATE},
        "splits": split_stats,
        "visual_genome": {"images": len(b.vg_files["image_data.json"]), "objects": b.next_object_id - 1,
                          "source_split": "train2014"},
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
                  "families": list(FAMILIES), "answers": answer_vocabulary()},
        "blind_prior": {
            "scored_on": "val2014", "trained_on": "train2014", "unit": "percent VQA accuracy",
            "family_prior": "best single answer per question family",
            "question_prior": "best answer per exact question string (family fallback)",
            **prior,
        },
    }


def generate(
    out_dir: str | os.PathLike,
    train_images: int = 2000,
    val_images: int = 500,
    test_images: int = 300,
    seed: int = 0,
    questions_per_image: int = 5,
    min_side: int = 160,
    max_side: int = 320,
    max_objects: int = 6,
    verbose: bool = False,
) -> dict[str, Any]:
    """Write the data set under `out_dir` in the official layout; return the stats (also in stats.json).

    Same arguments -> byte-identical files. Image ids run 1, 2, ... over train2014, val2014, test2015.
    """
    sizes = dict(zip(SPLITS, (train_images, val_images, test_images), strict=True))
    _check_args(list(sizes.values()), seed, questions_per_image, min_side, max_side, max_objects)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: output path exists and is not a folder")
    t0 = time.perf_counter()
    b = _Build(root, _Params(seed, questions_per_image, min_side, max_side, max_objects), _Writer())
    try:
        split_stats = {split: _write_split(b, n, split, sizes[split]) for n, split in enumerate(SPLITS)}
    finally:
        b.writer.close()
    _write_vg(b)
    stats = _stats(b, split_stats)
    atomic_write_json(layout.stats_path(root), stats, indent=1)
    if verbose:
        print(summary(stats, root, time.perf_counter() - t0))
    return stats


def summary(stats: dict[str, Any], root: Path, seconds: float) -> str:
    lines = [f"synthetic shapes -> {root} (seed {stats['seed']}, {seconds:.1f} s)"]
    for split, s in stats["splits"].items():
        lines.append(f"  {split:10s} {s['images']:6d} images {s['questions']:7d} questions"
                     + ("  (with answers)" if s["annotated"] else ""))
    v = stats["visual_genome"]
    lines.append(f"  Visual Genome: {v['images']} images, {v['objects']} objects (train2014 images)")
    bp = stats["blind_prior"]
    if "overall" in bp:
        lines.append("  blind prior on val2014 (VQA accuracy %): family  best-per-family  best-per-question")
        for f, r in bp["per_family"].items():
            lines.append(f"    {f:9s} {r['questions']:6d} q  {_fmt(r['family_prior']):>8s}  "
                         f"{_fmt(r['question_prior']):>8s}")
        o = bp["overall"]
        lines.append(f"    {'overall':9s} {o['questions']:6d} q  {_fmt(o['family_prior']):>8s}  "
                     f"{_fmt(o['question_prior']):>8s}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
