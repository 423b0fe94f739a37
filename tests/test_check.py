"""The data check tool on real broken and unusual files: every bad file named, exit codes."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gridvqa.data import layout
from gridvqa.data.check import check
from vqa_files import write_split

SPLIT = "val"
TEN = ["red"] * 6 + ["two"] * 4


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run([sys.executable, "-m", "gridvqa.data.check", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def img_path(root: Path, iid: int, split: str = SPLIT) -> Path:
    p = layout.coco_image_path(root, split, iid)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def write_unusual_images(root: Path, split: str = SPLIT) -> list[int]:
    """Valid images that look odd: grey, CMYK, RGBA / 16-bit PNG bytes behind .jpg, EXIF-rotated, 2000x20."""
    Image.effect_noise((64, 48), 60).convert("RGB").save(img_path(root, 1, split), quality=90)
    Image.new("L", (30, 20), 90).save(img_path(root, 2, split))
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(img_path(root, 3, split))
    Image.new("RGBA", (30, 20), (0, 255, 0, 128)).save(img_path(root, 4, split), format="PNG")
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(img_path(root, 5, split), format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (9, 9, 9)).save(img_path(root, 6, split), exif=exif.tobytes())
    Image.new("RGB", (2000, 20), (200, 10, 10)).save(img_path(root, 7, split))
    return [1, 2, 3, 4, 5, 6, 7]


def items_for(image_ids, start=100):
    return [(start + k, iid, f"What is in image {iid}?", TEN, "other") for k, iid in enumerate(image_ids)]


def write_vocab(root: Path, answers) -> None:
    layout.answers_path(root).write_text(json.dumps({"answers": list(answers), "min_count": 9}))


@pytest.fixture
def clean_root(tmp_path):
    root = tmp_path / "data"
    ids = write_unusual_images(root)
    write_split(root, SPLIT, items_for(ids))
    Image.new("RGB", (8, 8)).save(img_path(root, 99))  # an image no question refers to: not a problem
    write_vocab(root, ["red", "2"])  # "two" is normalised to "2"
    return root


def test_unusual_but_valid_images_are_clean(clean_root):
    rep = check(clean_root)
    assert rep.ok, rep.lines()
    assert rep.counts["images_ok"] == 7 and rep.counts["images_referenced"] == 7
    assert rep.counts["images_without_questions"] == 1 and rep.counts["questions"] == 7
    assert rep.counts["answers_outside_vocab"] == 0 and rep.counts["answers"] == 70
    assert "OK: no problems found" in rep.summary()


def test_clean_root_cli_exits_zero(clean_root):
    res = run_cli(str(clean_root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: no problems found" in res.stdout and "images without questions (not read): 1" in res.stdout


def broken_root(tmp_path) -> tuple[Path, dict[str, str]]:
    """A val split with one of every problem; returns root and {bad path: kind}."""
    root = tmp_path / "data"
    write_unusual_images(root)
    good = img_path(root, 1).read_bytes()
    Image.effect_noise((200, 150), 60).convert("RGB").save(img_path(root, 10), quality=90)
    big = img_path(root, 10).read_bytes()
    img_path(root, 10).write_bytes(big[: len(big) // 2])  # truncated JPEG
    img_path(root, 11).write_bytes(b"")  # empty
    img_path(root, 12).write_bytes(os.urandom(len(good)))  # random bytes
    # 13: referenced, no file; decoys that the dataset would not open (wrong extension, wrong split):
    Image.new("RGB", (8, 8)).save(img_path(root, 13).with_suffix(".png"))
    Image.new("RGB", (8, 8)).save(img_path(root, 13).parent / "COCO_train2014_000000000013.jpg")
    write_split(root, SPLIT, items_for([1, 2, 10, 11, 12, 13]))
    apath = layout.annotations_path(root, SPLIT)
    anns = json.loads(apath.read_text())
    dropped = anns["annotations"].pop(0)  # question 100 loses its annotation
    extra = dict(anns["annotations"][0], question_id=777)  # an annotation for no question
    anns["annotations"].append(extra)
    apath.write_text(json.dumps(anns))
    bad = {
        str(img_path(root, 10)): "truncated_image",
        str(img_path(root, 11)): "empty_image",
        str(img_path(root, 12)): "undecodable_image",
        str(img_path(root, 13)): "missing_image",
    }
    assert dropped["question_id"] == 100
    return root, bad


def test_every_problem_is_reported(tmp_path):
    root, bad = broken_root(tmp_path)
    rep = check(root, workers=2)
    assert not rep.ok
    found = {p.path: p.kind for p in rep.problems}
    for path, kind in bad.items():
        assert found.get(path) == kind, (path, rep.lines())
    kinds = rep.by_kind()
    assert kinds["question_without_annotation"] == 1 and kinds["annotation_without_question"] == 1
    msgs = "\n".join(rep.lines())
    assert "question 100" in msgs and "question 777" in msgs
    assert rep.counts["images_ok"] == 2  # the two good images still counted
    assert all("\n" not in p.message for p in rep.problems)


def test_broken_root_cli_names_every_bad_file(tmp_path):
    root, bad = broken_root(tmp_path)
    # A second split with malformed json: reported with line/column, and the val split is still checked.
    tq = layout.questions_path(root, "train")
    tq.write_text('{"questions": [\n  {"image_id": 1,,}\n]}')
    res = run_cli(str(root), "--splits", "train", "val")
    assert res.returncode == 1, res.stdout + res.stderr
    for path in bad:
        assert path in res.stdout, (path, res.stdout)
    assert f"{tq}: malformed json at line 2, column" in res.stdout
    assert str(layout.annotations_path(root, "train")) in res.stdout  # train needs annotations
    assert "FOUND" in res.stdout and "truncated_image: 1" in res.stdout


def test_explicit_files_and_split_from_names(tmp_path):
    root = tmp_path / "data"
    write_unusual_images(root, "train")
    folder = layout.images_dir(root, "train")
    (folder / "COCO_train2014_000000000008.jpg").write_bytes(b"")
    qs = {"questions": [{"image_id": i, "question": "q?", "question_id": i} for i in (1, 2, 8, 9)]}
    qfile = tmp_path / "q.json"  # no data_subtype: the split comes from the file names
    qfile.write_text(json.dumps(qs))
    rep = check(questions=qfile, images=folder)
    assert {(Path(p.path).name, p.kind) for p in rep.problems} == {
        ("COCO_train2014_000000000008.jpg", "empty_image"),
        ("COCO_train2014_000000000009.jpg", "missing_image"),
    }
    res = run_cli("--questions", str(qfile), "--images", str(folder))
    assert res.returncode == 1 and str(folder / "COCO_train2014_000000000008.jpg") in res.stdout


def test_explicit_annotations_and_vocab(tmp_path):
    root = tmp_path / "data"
    write_unusual_images(root)
    write_split(root, SPLIT, items_for([1, 2, 3]))
    qpath, apath = layout.questions_path(root, SPLIT), layout.annotations_path(root, SPLIT)
    vocab = tmp_path / "answers.json"
    vocab.write_text(json.dumps({"answers": ["blue"], "min_count": 9}))
    rep = check(questions=qpath, annotations=apath, images=layout.images_dir(root, SPLIT), answers=vocab)
    assert [p.kind for p in rep.problems] == ["answers_outside_vocab"]
    assert rep.counts["questions_without_vocab_answer"] == 3
    vocab.write_text(json.dumps({"answers": ["two"]}))  # human "two" normalises to "2": still outside
    rep = check(questions=qpath, annotations=apath, images=layout.images_dir(root, SPLIT), answers=vocab)
    assert [p.kind for p in rep.problems] == ["answers_outside_vocab"]
    vocab.write_text(json.dumps({"answers": ["2"]}))
    rep = check(questions=qpath, annotations=apath, images=layout.images_dir(root, SPLIT), answers=vocab)
    assert rep.ok and rep.counts["answers_outside_vocab"] == 18  # the six "red" of each question
    vocab.write_text("{broken")
    rep = check(questions=qpath, annotations=apath, images=layout.images_dir(root, SPLIT), answers=vocab)
    assert [(p.path, p.kind) for p in rep.problems] == [(str(vocab), "malformed_json")]


def test_defaults_and_missing_things(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rep = check(empty)
    assert [p.kind for p in rep.problems] == ["missing_file"]
    root = tmp_path / "data"
    write_split(root, "test", [(1, 5, "q?", [], "other")])  # test split: no annotations, no image folder
    rep = check(root)
    assert rep.counts["splits"] == 1
    no_folder = str(layout.images_dir(root, "test"))
    assert [(p.kind, p.path) for p in rep.problems] == [("missing_file", no_folder)]
    res = run_cli(str(root), "--splits", "nonsense")
    assert res.returncode == 2 and "unknown split" in res.stderr


# -- Visual Genome -------------------------------------------------------------------------------------------
def write_vg(root: Path) -> dict[str, str]:
    """A vg/ folder with one of every VG problem; returns {bad path: kind}."""
    vg = layout.vg_dir(root)
    for d in layout.VG_IMAGE_DIRS:
        (vg / d).mkdir(parents=True, exist_ok=True)
    (vg / "objects_vocab.txt").write_text("circle\nsquare\n")
    (vg / "attributes_vocab.txt").write_text("red\n")
    url = "https://cs.stanford.edu/people/rak248/{}/{}.jpg"
    folders = {1: "VG_100K", 2: "VG_100K_2", 3: "VG_100K_2", 4: "VG_100K", 5: "VG_100K"}
    meta = [{"image_id": i, "width": 60, "height": 40, "coco_id": None, "url": url.format(f, i)}
            for i, f in folders.items()]
    Image.new("RGB", (60, 40), (1, 2, 3)).save(vg / "VG_100K" / "1.jpg")
    Image.new("RGB", (60, 40), (1, 2, 3)).save(vg / "VG_100K_2" / "2.jpg")
    Image.new("RGB", (60, 40), (1, 2, 3)).save(vg / "VG_100K_2" / "4.jpg")  # not where its url says
    Image.effect_noise((200, 150), 60).convert("RGB").save(vg / "VG_100K" / "5.jpg", quality=90)
    big = (vg / "VG_100K" / "5.jpg").read_bytes()
    (vg / "VG_100K" / "5.jpg").write_bytes(big[: len(big) // 2])
    objs = [
        {"object_id": 10, "x": 1, "y": 1, "w": 10, "h": 10, "names": ["circle"]},
        {"object_id": 11, "x": float("nan"), "y": 1, "w": 10, "h": 10, "names": ["circle"]},
        {"object_id": 12, "x": 1, "y": "abc", "w": 10, "h": 10, "names": ["circle"]},
        {"object_id": 13, "x": 70, "y": 1, "w": 10, "h": 10, "names": ["square"]},  # right of a 60-wide image
        {"object_id": 14, "x": 55, "y": 1, "w": 10, "h": 10, "names": ["Square."]},  # partly outside
        {"object_id": 15, "x": 5, "y": 5, "w": 0, "h": 10, "names": ["circle"]},  # empty
        {"object_id": 16, "x": 5, "y": 5, "w": 10, "h": 10, "names": ["tree"]},  # not in the vocabulary
    ]
    anns = [{"image_id": 1, "attributes": objs}, {"image_id": 9, "attributes": []}]
    (vg / "attributes.json").write_text(json.dumps(anns))
    (vg / "objects.json").write_text(json.dumps([{"image_id": 1, "objects": objs[:1]}]))
    (vg / "image_data.json").write_text(json.dumps(meta))
    return {
        str(vg / "VG_100K_2" / "3.jpg"): "missing_image",
        str(vg / "VG_100K" / "5.jpg"): "truncated_image",
    }


def test_visual_genome_problems_are_reported(clean_root):
    bad = write_vg(clean_root)
    rep = check(clean_root)
    found = {p.path: p.kind for p in rep.problems if p.path.endswith(".jpg")}
    assert found == bad
    ann = str(layout.vg_dir(clean_root) / "attributes.json")
    kinds = Counter((p.path, p.kind) for p in rep.problems)
    assert kinds[(ann, "bad_box")] == 2 and kinds[(ann, "box_outside_image")] == 1
    assert kinds[(ann, "image_not_in_image_data")] == 1
    msgs = "\n".join(rep.lines())
    assert "object 11: box (x, y, w, h) = [nan, 1, 10, 10] is not four finite numbers" in msgs
    assert "object 12" in msgs and "object 13" in msgs and "lies outside the 60x40 image" in msgs
    c = rep.counts
    assert (c["vg_images"], c["vg_images_ok"], c["vg_boxes"]) == (5, 3, 5)
    assert (c["vg_boxes_clipped"], c["vg_boxes_empty"], c["vg_boxes_outside_vocab"]) == (1, 1, 1)
    assert any("1 image(s) are not in the folder their url names" in n for n in rep.notes)
    assert "Visual Genome: images: 5, images read ok: 3, boxes: 5" in rep.summary()
    assert rep.counts["images_ok"] == 7  # the VQA images are counted apart


def test_visual_genome_cli_and_unreadable_files(clean_root):
    write_vg(clean_root)
    vg = layout.vg_dir(clean_root)
    res = run_cli(str(clean_root))
    assert res.returncode == 1
    assert f"{vg / 'VG_100K_2' / '3.jpg'}: Visual Genome image 3 has no file" in res.stdout
    assert "[bad_box]" in res.stdout and "Visual Genome: images: 5" in res.stdout
    (vg / "attributes.json").write_text("[{")
    (vg / "objects_vocab.txt").unlink()
    (vg / "image_data.json").write_text(json.dumps({"images": []}))
    rep = check(clean_root)
    got = {(Path(p.path).name, p.kind) for p in rep.problems}
    assert {("attributes.json", "malformed_json"), ("objects_vocab.txt", "missing_file"),
            ("image_data.json", "malformed_json")} <= got


def test_built_in_visual_genome_is_clean(tiny_shapes):
    rep = check(tiny_shapes)
    assert rep.ok, rep.lines()
    assert rep.counts["vg_images"] > 0 and rep.counts["vg_images_ok"] == rep.counts["vg_images"]
    assert rep.counts["vg_boxes_outside_vocab"] == rep.counts["vg_boxes_clipped"] == 0
