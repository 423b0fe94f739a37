"""The synthetic shapes generator: official layout and schema, answers, balance, boxes, determinism, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gridvqa.data import layout
from gridvqa.data import synthetic as syn
from gridvqa.data.vg import VisualGenome
from gridvqa.data.vqa2 import load_split
from gridvqa.errors import DataError
from gridvqa.metrics.vqa_eval import normalize_answer

SMALL = {"train_images": 30, "val_images": 10, "test_images": 10}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    return root, syn.generate(root, seed=3, **SMALL)


@pytest.fixture(scope="module")
def mid(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes_mid")
    return root, syn.generate(root, train_images=600, val_images=200, test_images=0, seed=1)


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_official_file_names_and_question_schema(small):
    root, stats = small
    ids: dict[str, set[int]] = {}
    for split, n in zip(syn.SPLITS, SMALL.values(), strict=True):
        q = _json(layout.questions_path(root, split))
        assert q["task_type"] == "Open-Ended" and q["data_type"] == "mscoco" and q["data_subtype"] == split
        assert {"info", "license", "questions"} <= set(q)
        assert {x["image_id"] for x in q["questions"]} <= set(range(1, 10**6))
        for x in q["questions"]:
            assert set(x) == {"image_id", "question", "question_id"}
            assert x["question_id"] // 1000 == x["image_id"] and x["question"].endswith("?")
            assert layout.coco_image_path(root, split, x["image_id"]).is_file()
        files = sorted(layout.images_dir(root, split).glob("*.jpg"))
        assert len(files) == n == stats["splits"][split]["images"]
        assert all(re.fullmatch(rf"COCO_{split}_\d{{12}}\.jpg", f.name) for f in files)
        ids[split] = {int(f.stem.rsplit("_", 1)[1]) for f in files}
        assert len(q["questions"]) == stats["splits"][split]["questions"] >= 3 * n
        assert len({x["question_id"] for x in q["questions"]}) == len(q["questions"])
    assert not ids["train2014"] & ids["val2014"] and not ids["val2014"] & ids["test2015"]
    assert not ids["train2014"] & ids["test2015"]
    assert not layout.annotations_path(root, "test2015").exists()
    assert layout.stats_path(root).is_file()


def test_annotations_have_ten_human_answers_that_normalise_to_the_majority(small):
    root, _ = small
    vocab = set(syn.answer_vocabulary())
    for split in syn.ANNOTATED:
        a = _json(layout.annotations_path(root, split))
        qs = {x["question_id"]: x for x in _json(layout.questions_path(root, split))["questions"]}
        assert a["data_subtype"] == split and {"info", "license"} <= set(a)
        assert {x["question_id"] for x in a["annotations"]} == set(qs)
        for ann in a["annotations"]:
            assert ann["image_id"] == qs[ann["question_id"]]["image_id"]
            assert ann["answer_type"] in ("yes/no", "number", "other")
            assert qs[ann["question_id"]]["question"].lower().startswith(ann["question_type"])
            answers = ann["answers"]
            assert [x["answer_id"] for x in answers] == list(range(1, 11))
            assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in answers)
            norm = Counter(normalize_answer(x["answer"]) for x in answers)
            mc = ann["multiple_choice_answer"]
            assert mc in vocab and norm.most_common(1)[0][0] == mc and norm[mc] >= 10 - syn.MAX_WRONG
            if ann["answer_type"] == "number":
                assert mc.isdigit()
            if ann["answer_type"] == "yes/no":
                assert mc in ("yes", "no")


def test_human_answers_vary_like_people_and_every_variant_normalises():
    for ans in syn.answer_vocabulary():
        for v in syn.answer_variants(ans):
            assert v != ans and normalize_answer(v) == ans, (ans, v)
    rng = np.random.default_rng(0)
    raw = [r["answer"] for _ in range(200) for r in syn.human_answers("2", [str(k) for k in range(5)], rng)]
    assert {"2", "two", "Two", "2."} <= set(raw)
    wrong = sum(normalize_answer(a) != "2" for a in raw) / len(raw)
    assert 0.02 < wrong < 0.09


def test_readers_load_the_generated_set(small):
    root, stats = small
    train = load_split(root, "train")
    assert len(train) == stats["splits"]["train2014"]["questions"]
    assert all(len(e.answers) == 10 for e in train)
    assert all(not e.answers for e in load_split(root, "test"))
    vg = VisualGenome(layout.vg_dir(root))
    assert len(vg) == SMALL["train_images"] == stats["visual_genome"]["images"]
    assert vg.stats.dropped_unknown_class == vg.stats.dropped_degenerate == vg.stats.unknown_attributes == 0
    assert vg.stats.boxes == stats["visual_genome"]["objects"]


def test_visual_genome_files_cover_train_images_only_with_vocab(small):
    root, _ = small
    vg = layout.vg_dir(root)
    meta = _json(vg / "image_data.json")
    objects, attributes = _json(vg / "objects.json"), _json(vg / "attributes.json")
    train_ids = {int(p.stem.rsplit("_", 1)[1]) for p in layout.images_dir(root, "train").glob("*.jpg")}
    assert {m["image_id"] for m in meta} == train_ids and len(meta) == SMALL["train_images"]
    assert all(m["coco_id"] == m["image_id"] and m["flickr_id"] is None for m in meta)
    order = [m["image_id"] for m in meta]
    assert [o["image_id"] for o in objects] == [a["image_id"] for a in attributes] == order
    obj_vocab = (vg / "objects_vocab.txt").read_text().split()
    attr_vocab = (vg / "attributes_vocab.txt").read_text().split()
    obj_ids = []
    for o, a in zip(objects, attributes, strict=True):
        for x, y in zip(o["objects"], a["attributes"], strict=True):
            assert {"object_id", "x", "y", "w", "h", "names", "synsets"} <= set(x)
            assert x == {k: y[k] for k in x}
            assert x["names"][0] in obj_vocab and set(y["attributes"]) <= set(attr_vocab)
            obj_ids.append(x["object_id"])
    assert len(set(obj_ids)) == len(obj_ids)
    for m in meta[:5]:
        coco = layout.coco_image_path(root, "train2014", m["image_id"])
        vg_img = layout.vg_image_path(root, m["image_id"])
        assert vg_img.parent.name == "VG_100K" and vg_img.read_bytes() == coco.read_bytes()
        with Image.open(vg_img) as im:
            assert im.size == (m["width"], m["height"]) and im.format == "JPEG"


def _colour_mask(img: np.ndarray, colour: str) -> np.ndarray:
    """Pixels near the nominal colour (object colours are jittered by <= 15 per channel, plus noise)."""
    ref = np.array(syn.COLORS[colour], dtype=np.float32)
    return np.linalg.norm(img.astype(np.float32) - ref, axis=-1) < 50


def _iou(a: tuple, b: tuple) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


def test_boxes_are_inside_images_tight_and_apart(small):
    root, _ = small
    vg = layout.vg_dir(root)
    sizes = {m["image_id"]: (m["width"], m["height"]) for m in _json(vg / "image_data.json")}
    checked = 0
    for entry in _json(vg / "attributes.json"):
        w, h = sizes[entry["image_id"]]
        img = np.asarray(Image.open(layout.vg_image_path(root, entry["image_id"])).convert("RGB"))
        boxes = [(o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]) for o in entry["attributes"]]
        for k, o in enumerate(entry["attributes"]):
            x, y, bw, bh = o["x"], o["y"], o["w"], o["h"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and bw >= 4 and bh >= 4
            m = _colour_mask(img, o["attributes"][0])
            for j, (x0, y0, x1, y1) in enumerate(boxes):  # neighbours' corners may come close
                if j != k:
                    m[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
            inside = m[y : y + bh, x : x + bw]
            # Tight: the shape reaches each side of its box (within 2 px, for JPEG edges) ...
            assert inside[:2].any() and inside[-2:].any() and inside[:, :2].any() and inside[:, -2:].any()
            assert inside.mean() > 0.3
            # ... and nothing of its colour lies in a 3-px ring just outside the box.
            outer = m[max(y - 4, 0) : y + bh + 4, max(x - 4, 0) : x + bw + 4].sum()
            assert outer - m[max(y - 1, 0) : y + bh + 1, max(x - 1, 0) : x + bw + 1].sum() <= 2
            checked += 1
        # Shapes never overlap; their boxes may only touch at the corners.
        for i, a in enumerate(boxes):
            assert all(_iou(a, b) < 0.1 for b in boxes[i + 1 :]), "objects overlap"
    assert checked >= SMALL["train_images"]


def test_image_sizes_vary_within_bounds(small):
    root, _ = small
    sizes = {(m["width"], m["height"]) for m in _json(layout.vg_dir(root) / "image_data.json")}
    assert all(160 <= w <= 320 and 160 <= h <= 320 for w, h in sizes)
    ratios = [w / h for w, h in sizes]
    assert len(sizes) > 20 and min(ratios) < 0.8 and max(ratios) > 1.25


def test_answers_agree_with_the_drawn_objects(small):
    """Re-derive colour / shape / count / existence answers from the VG boxes of the same images."""
    root, _ = small
    objs = {e["image_id"]: [(o["names"][0], *o["attributes"]) for o in e["attributes"]]
            for e in _json(layout.vg_dir(root) / "attributes.json")}
    anns = {a["question_id"]: a["multiple_choice_answer"]
            for a in _json(layout.annotations_path(root, "train"))["annotations"]}
    words = set(syn.SHAPES) | set(syn.COLORS) | set(syn.SIZES)

    def matching(image_id: int, phrase: str) -> list[tuple]:
        ws = [w[:-2] if w == "crosses" else w.rstrip("s") if w.rstrip("s") in syn.SHAPES else w
              for w in phrase.split()]
        want = [w for w in ws if w in words]
        return [o for o in objs[image_id] if all(w in o for w in want)]

    seen = Counter()
    for q in _json(layout.questions_path(root, "train"))["questions"]:
        text, ans, iid = q["question"], anns[q["question_id"]], q["image_id"]
        if m := re.fullmatch(r"How many (.+) are there\?", text):
            assert ans == str(len(matching(iid, m[1]))), text
            seen["count"] += 1
        elif m := re.fullmatch(r"Is there an? (.+)\?", text):
            assert ans == ("yes" if matching(iid, m[1]) else "no"), text
            seen["exist"] += 1
        elif m := re.fullmatch(r"What color is the (.+)\?", text):
            if m[1].split()[-1] == "object":  # leftmost / topmost ...: positional, checked elsewhere
                continue
            (hit,) = matching(iid, m[1])
            assert ans == hit[1], text
            seen["color"] += 1
    assert min(seen.values()) >= 3 and len(seen) == 3


def test_positions_agree_with_the_boxes(small):
    root, _ = small
    boxes = {e["image_id"]: e["attributes"] for e in _json(layout.vg_dir(root) / "attributes.json")}
    anns = {a["question_id"]: a["multiple_choice_answer"]
            for a in _json(layout.annotations_path(root, "train"))["annotations"]}
    checked = 0
    for q in _json(layout.questions_path(root, "train"))["questions"]:
        m = re.fullmatch(r"What (color|shape) is the (\w+most) object\?", q["question"])
        if not m:
            continue
        objs = boxes[q["image_id"]]
        key = {"leftmost": lambda o: o["x"] + o["w"] / 2, "rightmost": lambda o: -(o["x"] + o["w"] / 2),
               "topmost": lambda o: o["y"] + o["h"] / 2, "bottommost": lambda o: -(o["y"] + o["h"] / 2)}[m[2]]
        best = min(objs, key=key)
        got = best["names"][0] if m[1] == "shape" else best["attributes"][0]
        assert got == anns[q["question_id"]], q["question"]
        checked += 1
    assert checked >= 2


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    kw = {"train_images": 6, "val_images": 3, "test_images": 2}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    syn.generate(a, seed=5, **kw)
    syn.generate(b, seed=5, **kw)
    syn.generate(c, seed=6, **kw)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    fa, fb, fc = files(a), files(b), files(c)
    images, vg_images, jsons, vocabs = 6 + 3 + 2, 6, 3 + 2 + 3 + 1, 2
    assert len(fa) == images + vg_images + jsons + vocabs and fa == fb
    name = str(layout.coco_image_path(a, "train", 1).relative_to(a))
    assert fa[name] != fc[name]
    syn.generate(a, seed=5, **kw)  # writing again over an existing set replaces it in place
    assert files(a) == fb


def test_balanced_answers_and_low_blind_prior(mid):
    root, stats = mid
    prior = stats["blind_prior"]
    assert prior["overall"]["question_prior"] <= 40.0, prior["overall"]
    assert prior["overall"]["family_prior"] <= 40.0
    for fam in ("color", "shape", "count", "position"):
        assert prior["per_family"][fam]["question_prior"] <= 40.0, fam
    assert all(prior["per_family"][f]["questions"] > 0 for f in syn.FAMILIES)
    # Per exact question string, answers never drift apart by more than one (answer-first generation).
    per: dict[str, Counter] = defaultdict(Counter)
    qs = {x["question_id"]: x["question"] for x in _json(layout.questions_path(root, "train"))["questions"]}
    for a in _json(layout.annotations_path(root, "train"))["annotations"]:
        per[qs[a["question_id"]]][a["multiple_choice_answer"]] += 1
    for text, c in per.items():
        if sum(c.values()) >= 8:
            assert max(c.values()) - min(c.values()) <= 1, (text, c)
    assert _json(layout.stats_path(root)) == json.loads(json.dumps(stats))


def test_blind_prior_detects_a_biased_set():
    """The measure must be able to fail: a set where one string always has the same answer scores high."""
    items = [{"family": "exist", "question": "Is there a cat?", "multiple_choice_answer": "yes",
              "answers": ["yes"] * 10}] * 20
    prior = syn.blind_prior(items, items)
    assert prior["overall"]["question_prior"] == 100.0 and prior["per_family"]["exist"]["questions"] == 20


def test_bad_arguments_give_one_line_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        syn.generate(f, train_images=1, val_images=0, test_images=0)
    with pytest.raises(ValueError, match="train_images"):
        syn.generate(tmp_path / "x", train_images=-1)


def test_cli_runs_as_a_module(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(syn.__file__).parents[3])}  # src/
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "gridvqa.data.synthetic", str(out), "--train-images", "4",
           "--val-images", "3", "--test-images", "2", "--seed", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "blind prior" in r.stdout and "train2014" in r.stdout
    assert _json(layout.stats_path(out))["splits"]["val2014"]["images"] == 3
    bad = subprocess.run([*cmd[:3], str(tmp_path / "data" / "stats.json")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not a folder" in bad.stderr
    neg = subprocess.run([*cmd[:4], "--train-images", "-2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert neg.returncode == 2 and "must be >= 0" in neg.stderr
