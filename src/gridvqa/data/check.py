"""Check a VQA v2-format data set (and its Visual Genome folder) before training: every problem found,
each bad file named.

    python -m gridvqa.data.check DATA_ROOT [--splits train val test]
    python -m gridvqa.data.check --questions Q.json [--annotations A.json] --images DIR [--answers A.json]

Problems (exit status 1): missing or malformed json, an image a question refers to that has no file,
empty / truncated / undecodable images (fully decoded, as training would), questions without an
annotation and annotations without a question, duplicate ids, a vocabulary most questions cannot hit.
Not problems, only counted: images no question refers to (they are not read), unusual but valid images
(grey, CMYK, RGBA, 16-bit, EXIF-rotated, extreme aspect ratios). Exit status 0 when clean.

DATA_ROOT/vg/, when there, is checked too: image_data / attributes / objects json and the vocabulary
files readable, every image of image_data.json present where its url says (VG_100K or VG_100K_2) and
decodable, every box four finite numbers that reach into its image. Boxes that only partly leave the
image, are empty, or name no vocabulary class are counted: training clips, drops and counts them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridvqa.data import layout
from gridvqa.data.images import ImageError, load_image
from gridvqa.data.jsonio import load_json
from gridvqa.data.vg import box_from_object, clean_object_name, image_folder, read_vocab
from gridvqa.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_SPLITS = ("train2014", "val2014", "test-dev2015", "test2015")
COCO_NAME = re.compile(r"^COCO_(?P<split>[A-Za-z0-9-]+)_(?P<id>\d+)\.(?P<ext>jpe?g|png)$", re.IGNORECASE)
# Kinds about one record inside a json file: capped when printed, a broken file would print 400k lines.
RECORD_KINDS = frozenset({
    "bad_record", "duplicate_question_id", "duplicate_annotation", "question_without_annotation",
    "annotation_without_question", "image_id_mismatch", "bad_box", "box_outside_image",
    "image_not_in_image_data",
})
VG_ANNOTATIONS = (("attributes.json", "attributes"), ("objects.json", "objects"))


@dataclass
class Problem:
    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: str | Path, kind: str, message: str) -> None:
        self.problems.append(Problem(str(path), kind, message))

    def by_kind(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def bad_paths(self) -> set[str]:
        return {p.path for p in self.problems}

    def lines(self, max_per_kind: int | None = 20) -> list[str]:
        """Every file-level problem; record-level kinds cut at `max_per_kind` lines each (None: all)."""
        out, shown, hidden = [], Counter(), Counter()
        for p in self.problems:
            if p.kind in RECORD_KINDS and max_per_kind is not None and shown[p.kind] >= max_per_kind:
                hidden[p.kind] += 1
                continue
            shown[p.kind] += 1
            out.append(str(p))
        out += [f"[{k}] ... and {n} more" for k, n in sorted(hidden.items())]
        return out

    def summary(self) -> str:
        c = self.counts
        parts = [
            f"questions: {c['questions']}",
            f"annotations: {c['annotations']}",
            f"images referenced: {c['images_referenced']}",
            f"images read ok: {c['images_ok']}",
            f"images without questions (not read): {c['images_without_questions']}",
        ]
        head = "summary: " + ", ".join(parts)
        if c["vg_images"] or c["vg_boxes"]:
            head += "\nVisual Genome: " + ", ".join([
                f"images: {c['vg_images']}",
                f"images read ok: {c['vg_images_ok']}",
                f"boxes: {c['vg_boxes']}",
                f"partly outside the image (clipped): {c['vg_boxes_clipped']}",
                f"empty (dropped): {c['vg_boxes_empty']}",
                f"name outside the vocabulary (dropped): {c['vg_boxes_outside_vocab']}",
            ])
        if self.ok:
            return head + "\nOK: no problems found"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.by_kind().items()))
        return head + f"\nFOUND {len(self.problems)} problem(s) ({kinds})"


# ---------------------------------------------------------------------------------------------------
# json files


def _load(path: Path, what: str, report: Report) -> Any | None:
    """load_json, with a failure recorded as a problem instead of raised."""
    try:
        return load_json(path, what)
    except DataError as e:
        kind = "missing_file" if not path.is_file() else "malformed_json"
        report.add(path, kind, str(e))
        return None


def _records(data: Any, key: str, path: Path, fields: Sequence[str], report: Report) -> list[dict] | None:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        report.add(path, "malformed_json", f"{path}: expected a json object with a {key!r} list")
        return None
    good = []
    for i, r in enumerate(data[key]):
        missing = [f for f in fields if not isinstance(r, dict) or f not in r]
        bad_ids = [] if missing else [f for f in fields if f.endswith("_id") and not _is_int(r[f])]
        if missing or bad_ids:
            why = f"no {missing}" if missing else f"non-integer {bad_ids}"
            report.add(path, "bad_record", f"{path}: {key} #{i} has {why}")
            continue
        good.append(r)
    return good


def _is_int(x: object) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, str) and x.isdigit())


def _load_vocab(path: Path, report: Report) -> set[str] | None:
    data = _load(path, "answer vocabulary", report)
    if data is None:
        return None
    answers = data.get("answers") if isinstance(data, dict) else None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        report.add(path, "malformed_json", f'{path}: expected {{"answers": [str, ...], "min_count": int}}')
        return None
    return set(answers)


# ---------------------------------------------------------------------------------------------------
# images


def _scan_images(folder: Path, split: str | None, exts: Sequence[str]) -> tuple[dict[int, Path], set[str]]:
    """COCO-named files in `folder` (flat): ({image_id: path} of `split` (None: any), splits seen)."""
    by_id: dict[int, Path] = {}
    splits: set[str] = set()
    with os.scandir(folder) as it:
        for entry in it:
            m = COCO_NAME.match(entry.name)
            if not m:
                continue
            splits.add(m["split"])
            if (split is None or m["split"] == split) and "." + m["ext"].lower() in exts:
                by_id.setdefault(int(m["id"]), Path(entry.path))
    return by_id, splits


def _read_one(path: Path) -> ImageError | None:
    # Return only the outcome, never the pixels: thousands of decoded images must not pile up in memory.
    try:
        load_image(path)
    except ImageError as e:
        return e
    return None


def _read_images(paths: Iterable[Path], report: Report, workers: int | None, cache: dict[Path, Any],
                 counter: str = "images_ok") -> None:
    """Fully decode each file once (threads: PIL releases the GIL while decoding)."""
    todo = sorted({p for p in paths if p not in cache})
    if todo:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for k, (p, err) in enumerate(zip(todo, pool.map(_read_one, todo), strict=True), 1):
                cache[p] = err
                if k % 10000 == 0:
                    log.info("read %d / %d images", k, len(todo))
    for p in sorted(set(paths)):
        err = cache[p]
        if err is None:
            report.counts[counter] += 1
        else:
            report.add(p, f"{err.kind}_image", str(err))


# ---------------------------------------------------------------------------------------------------
# one split


def check_split(
    questions: Path,
    annotations: Path | None,
    images: Path,
    report: Report,
    *,
    split: str | None = None,
    vocab: set[str] | None = None,
    exts: Sequence[str] = (".jpg", ".jpeg", ".png"),
    workers: int | None = None,
    max_oov: float = 0.5,
    cache: dict[Path, Any] | None = None,
) -> None:
    """Check one questions file (+ annotations) against an image folder, adding to `report`.

    `split` is the image folder split (e.g. val2014); None: read from the questions' `data_subtype`,
    else from the file names in `images` (any split when they disagree).
    """
    cache = {} if cache is None else cache
    qdata = _load(questions, "VQA questions file", report)
    qs = _records(qdata, "questions", questions, ("image_id", "question", "question_id"), report) \
        if qdata is not None else None
    if qs is None:
        # Without questions every cross-check would only repeat this one problem; still parse the rest.
        if annotations is not None:
            _load(annotations, "VQA annotations file", report)
        return
    report.counts["questions"] += len(qs)

    q_by_id: dict[int, dict] = {}
    for q in qs:
        qid = int(q["question_id"])
        if qid in q_by_id:
            report.add(questions, "duplicate_question_id", f"{questions}: question_id {qid} appears twice")
        q_by_id[qid] = q

    if split is None and isinstance(qdata, dict) and isinstance(qdata.get("data_subtype"), str):
        try:
            split = layout.image_folder_split(qdata["data_subtype"])
        except ValueError:
            split = None
    _check_annotations(questions, annotations, q_by_id, report, vocab, max_oov)
    _check_images(images, split, exts, q_by_id, report, workers, cache)


def _check_annotations(questions: Path, annotations: Path | None, q_by_id: dict[int, dict], report: Report,
                       vocab: set[str] | None, max_oov: float) -> None:
    if annotations is None:
        return
    adata = _load(annotations, "VQA annotations file", report)
    anns = _records(adata, "annotations", annotations, ("question_id", "image_id", "answers"), report) \
        if adata is not None else None
    if anns is None:
        return
    report.counts["annotations"] += len(anns)
    a_by_id: dict[int, dict] = {}
    for a in anns:
        qid = int(a["question_id"])
        if qid in a_by_id:
            report.add(annotations, "duplicate_annotation", f"{annotations}: question {qid} annotated twice")
        a_by_id[qid] = a
        q = q_by_id.get(qid)
        if q is None:
            report.add(annotations, "annotation_without_question",
                       f"{annotations}: annotation for question {qid} has no question in {questions}")
        elif int(q["image_id"]) != int(a["image_id"]):
            report.add(annotations, "image_id_mismatch",
                       f"{annotations}: question {qid} is on image {q['image_id']} in {questions} "
                       f"but on image {a['image_id']} here")
    for qid, q in q_by_id.items():
        if qid not in a_by_id:
            report.add(annotations, "question_without_annotation",
                       f"{annotations}: no annotation for question {qid} (image {q['image_id']}) "
                       f"of {questions}")
    if vocab is not None:
        _check_vocab(annotations, [a for qid, a in a_by_id.items() if qid in q_by_id], vocab, report, max_oov)


def _check_vocab(annotations: Path, anns: list[dict], vocab: set[str], report: Report,
                 max_oov: float) -> None:
    # Imported here: the scorer is only needed when a vocabulary is checked.
    from gridvqa.metrics.vqa_eval import normalize_answer

    total = oov = no_hit = 0
    for a in anns:
        answers = [normalize_answer(str(x.get("answer", ""))) for x in a["answers"] if isinstance(x, dict)]
        misses = sum(ans not in vocab for ans in answers)
        total += len(answers)
        oov += misses
        no_hit += bool(answers) and misses == len(answers)
    report.counts["answers"] += total
    report.counts["answers_outside_vocab"] += oov
    report.counts["questions_without_vocab_answer"] += no_hit
    if not anns:
        return
    share_a = oov / max(total, 1)
    share_q = no_hit / len(anns)
    report.notes.append(f"{annotations}: {share_a:.1%} of human answers and {share_q:.1%} of questions "
                        f"({no_hit}/{len(anns)}) have no answer in the vocabulary")
    if share_q > max_oov:
        report.add(annotations, "answers_outside_vocab",
                   f"{annotations}: {share_q:.1%} of questions have no answer in the vocabulary "
                   f"(more than {max_oov:.0%}: wrong answers.json for this data?)")


def _check_images(images: Path, split: str | None, exts: Sequence[str], q_by_id: dict[int, dict],
                  report: Report, workers: int | None, cache: dict[Path, Any]) -> None:
    wanted = {int(q["image_id"]) for q in q_by_id.values()}
    report.counts["images_referenced"] += len(wanted)
    if not images.is_dir():
        report.add(images, "missing_file",
                   f"{images}: image folder not found ({len(wanted)} image(s) referenced by the questions)")
        return
    by_id, splits = _scan_images(images, split, exts)
    if split is None and len(splits) == 1:
        split = next(iter(splits))
    for iid in sorted(wanted - by_id.keys()):
        name = f"COCO_{split or '*'}_{iid:012d}{exts[0]}"
        report.add(images / name, "missing_image", f"{images / name}: image {iid} has questions but no file")
    report.counts["images_without_questions"] += len(by_id.keys() - wanted)
    _read_images([by_id[i] for i in wanted if i in by_id], report, workers, cache)


# ---------------------------------------------------------------------------------------------------
# Visual Genome


def check_vg(
    vg_dir: Path, report: Report, *, workers: int | None = None, cache: dict[Path, Any] | None = None
) -> None:
    """Check a Visual Genome folder in the layout of gridvqa.data.layout, adding to `report`."""
    cache = {} if cache is None else cache
    vocab: set[str] | None = None
    for name in ("objects_vocab.txt", "attributes_vocab.txt"):
        path = vg_dir / name
        try:
            _, lookup = read_vocab(path)
        except (DataError, UnicodeDecodeError) as e:
            kind = "missing_file" if not path.is_file() else "malformed_vocab"
            report.add(path, kind, str(e) if isinstance(e, DataError) else f"{path}: not UTF-8 text")
            continue
        if name == "objects_vocab.txt":
            vocab = set(lookup)
    sizes = _vg_images(vg_dir / "image_data.json", report)
    annotated = 0
    for name, key in VG_ANNOTATIONS:
        path = vg_dir / name
        if not path.is_file() and name == "objects.json":
            report.notes.append(f"{path}: not there (only needed with attributes off)")
            continue
        # Both files hold the same boxes: count them once, from the first file read.
        annotated += _vg_boxes(path, key, sizes, vocab, report, count=annotated == 0)
    if sizes is None:
        return
    report.counts["vg_images"] += len(sizes)
    found, elsewhere = [], 0
    for iid, (_, _, folder) in sorted(sizes.items()):
        name = f"{iid}.jpg"
        where = [folder] if folder else list(layout.VG_IMAGE_DIRS)
        path = next((vg_dir / d / name for d in where if (vg_dir / d / name).is_file()), None)
        if path is None and folder:
            other = [vg_dir / d / name for d in layout.VG_IMAGE_DIRS if d != folder]
            path = next((p for p in other if p.is_file()), None)
            elsewhere += path is not None
        if path is None:
            expected = vg_dir / (folder or layout.VG_IMAGE_DIRS[0]) / name
            report.add(expected, "missing_image", f"{expected}: Visual Genome image {iid} has no file")
        else:
            found.append(path)
    if elsewhere:
        report.notes.append(f"{vg_dir}: {elsewhere} image(s) are not in the folder their url names "
                            "(found in the other one, which training also reads)")
    _read_images(found, report, workers, cache, counter="vg_images_ok")


def _vg_images(path: Path, report: Report) -> dict[int, tuple[int, int, str | None]] | None:
    """{image_id: (width, height, url folder)} of image_data.json; bad records reported."""
    data = _load(path, "Visual Genome image_data.json", report)
    if data is None:
        return None
    if not isinstance(data, list):
        report.add(path, "malformed_json", f"{path}: expected a json list of images")
        return None
    sizes: dict[int, tuple[int, int, str | None]] = {}
    for i, m in enumerate(data):
        iid = m.get("image_id", m.get("id")) if isinstance(m, dict) else None
        w, h = (m.get("width"), m.get("height")) if isinstance(m, dict) else (None, None)
        if not (_is_int(iid) and _is_int(w) and _is_int(h) and int(w) > 0 and int(h) > 0):
            report.add(path, "bad_record", f"{path}: image #{i} lacks an integer image_id or a positive "
                       "integer width and height")
            continue
        sizes[int(iid)] = (int(w), int(h), image_folder(m.get("url")))
    return sizes


def _vg_boxes(path: Path, key: str, sizes: dict[int, tuple[int, int, str | None]] | None,
              vocab: set[str] | None, report: Report, count: bool) -> int:
    """Check the boxes of attributes.json / objects.json; returns how many images it annotates."""
    data = _load(path, f"Visual Genome {path.name}", report)
    if data is None:
        return 0
    if not isinstance(data, list):
        report.add(path, "malformed_json", f"{path}: expected a json list of images")
        return 0
    c = report.counts if count else Counter()
    for i, entry in enumerate(data):
        iid = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        objs = entry.get(key) if isinstance(entry, dict) else None
        if not _is_int(iid) or not isinstance(objs, list):
            report.add(path, "bad_record", f"{path}: image #{i} lacks an integer image_id or a {key!r} list")
            continue
        iid = int(iid)
        size = sizes.get(iid) if sizes is not None else None
        if sizes is not None and size is None:
            report.add(path, "image_not_in_image_data", f"{path}: image {iid} is not in image_data.json")
        for k, o in enumerate(objs):
            oid = o.get("object_id", f"#{k}") if isinstance(o, dict) else f"#{k}"
            box = box_from_object(o) if isinstance(o, dict) else None
            if box is None:
                values = [o.get(f) for f in ("x", "y", "w", "h")] if isinstance(o, dict) else o
                report.add(path, "bad_box", f"{path}: image {iid} object {oid}: box (x, y, w, h) = {values} "
                           "is not four finite numbers (training drops it)")
                continue
            c["vg_boxes"] += 1
            names = o.get("names") or ([o["name"]] if "name" in o else [])
            if vocab is not None and (not names or clean_object_name(str(names[0]))[0] not in vocab):
                c["vg_boxes_outside_vocab"] += 1
            x, y, w, h = box
            if w <= 0 or h <= 0:
                c["vg_boxes_empty"] += 1
            elif size is not None:
                width, height = size[0], size[1]
                if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                    report.add(path, "box_outside_image", f"{path}: image {iid} object {oid}: box "
                               f"(x, y, w, h) = {list(box)} lies outside the {width}x{height} image")
                elif x < 0 or y < 0 or x + w > width or y + h > height:
                    c["vg_boxes_clipped"] += 1
    return len(data)


# ---------------------------------------------------------------------------------------------------
# entry points


def check(
    root: str | Path | None = None,
    splits: Sequence[str] | None = None,
    *,
    questions: str | Path | None = None,
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    answers: str | Path | None = None,
    workers: int | None = None,
    max_oov: float = 0.5,
) -> Report:
    """Check a data root in the documented layout, or one explicit questions / annotations / image folder."""
    report = Report()
    cache: dict[Path, Any] = {}
    if root is None:
        if questions is None or images is None:
            raise ValueError("check() needs a data root, or questions and images")
        vocab = _load_vocab(Path(answers), report) if answers is not None else None
        check_split(Path(questions), Path(annotations) if annotations else None, Path(images), report,
                    vocab=vocab, workers=workers, max_oov=max_oov, cache=cache)
        return report

    root = Path(root)
    vocab_path = Path(answers) if answers is not None else layout.answers_path(root)
    vocab = _load_vocab(vocab_path, report) if vocab_path.exists() or answers is not None else None
    if vocab is None and not vocab_path.exists():
        report.notes.append(f"{vocab_path}: no answer vocabulary; answer coverage not checked")
    if splits:
        wanted = [layout.official_split(s) for s in splits]
    else:
        wanted = [s for s in DEFAULT_SPLITS if layout.questions_path(root, s).is_file()]
        if not wanted:
            report.add(root / "vqa", "missing_file",
                       f"{root / 'vqa'}: no VQA questions files found (expected e.g. "
                       f"{layout.questions_path(root, 'train').name})")
    for s in wanted:
        apath = layout.annotations_path(root, s)
        if not apath.is_file() and s in ("train2014", "val2014"):
            report.add(apath, "missing_file",
                       f"{apath}: VQA annotations file not found (split {s} needs answers)")
        report.counts["splits"] += 1
        check_split(layout.questions_path(root, s), apath if apath.is_file() else None,
                    layout.images_dir(root, s), report, split=layout.image_folder_split(s), vocab=vocab,
                    exts=(".jpg",), workers=workers, max_oov=max_oov, cache=cache)
    vg = layout.vg_dir(root)
    if vg.is_dir():
        check_vg(vg, report, workers=workers, cache=cache)
    else:
        report.notes.append(f"{vg}: no Visual Genome folder; detector pre-training data not checked")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridvqa.data.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", help="data root in the gridvqa layout (see gridvqa.data.layout)")
    ap.add_argument("--splits", nargs="+",
                    help="splits to check (default: every split whose questions exist)")
    ap.add_argument("--questions", help="a VQA questions json (instead of a data root)")
    ap.add_argument("--annotations", help="its annotations json")
    ap.add_argument("--images", help="folder of COCO_{split}_{id:012d}.jpg images")
    ap.add_argument("--answers",
                    help='answer vocabulary {"answers": [...]} (default: DATA_ROOT/answers.json)')
    ap.add_argument("--workers", type=int, default=None, help="decoding threads")
    ap.add_argument("--max-oov", type=float, default=0.5,
                    help="a problem when more than this share of questions has no answer in the vocabulary")
    ap.add_argument("--max-per-kind", type=int, default=20,
                    help="print at most this many record-level problems per kind (bad files are all printed)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    args = ap.parse_args(argv)
    if (args.root is None) == (args.questions is None):
        ap.error("give either DATA_ROOT or --questions (with --images)")
    if args.questions is not None and args.images is None:
        ap.error("--questions needs --images")
    if args.root is not None and (args.annotations or args.images):
        ap.error("--annotations / --images go with --questions, not with DATA_ROOT")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    # Every bad image is already a problem line; the loader's own warnings would only repeat them.
    logging.getLogger("PIL").setLevel(logging.ERROR)
    try:
        report = check(args.root, args.splits, questions=args.questions, annotations=args.annotations,
                       images=args.images, answers=args.answers, workers=args.workers, max_oov=args.max_oov)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.lines(args.max_per_kind):
        print(line)
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
