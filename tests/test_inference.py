"""Evaluate and predict from a real (tiny) checkpoint made by a Lightning fit of Hydra-composed configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import Container, OmegaConf

from ckpt_utils import train_pixels_checkpoint
from gridvqa.data import layout
from gridvqa.data.prepare import prepare
from gridvqa.data.synthetic import generate
from gridvqa.data.vqa2 import read_questions
from gridvqa.errors import ConfigError, DataError
from gridvqa.inference import (
    TRAIN_HINT,
    evaluate_split,
    load_checkpoint,
    load_model,
    predict,
)
from gridvqa.lit.vqa_module import VQAModule
from gridvqa.metrics import vqa_eval

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, checkpoint path, the trained module): one Lightning step, as `gridvqa.train` builds it."""
    tmp = tmp_path_factory.mktemp("inference")
    root = tmp / "data"
    generate(root, train_images=8, val_images=4, test_images=3)
    prepare(root, min_count=1)
    ckpt, model = train_pixels_checkpoint(root, tmp)
    return root, ckpt, model


def _image(root: Path, split: str = "val") -> Path:
    qid = read_questions(layout.questions_path(root, split))[0]
    return layout.coco_image_path(root, split, qid["image_id"])


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


# -- loading --------------------------------------------------------------------------------------


def test_load_model_needs_only_the_checkpoint(trained, tmp_path):
    root, ckpt, model = trained
    hidden = root.with_name("data_hidden")
    root.rename(hidden)  # no data folder: answers, tokenizer and image settings come from the checkpoint
    try:
        loaded = load_model(ckpt)
    finally:
        hidden.rename(root)
    assert not loaded.training
    assert loaded.answers == model.answers
    assert loaded.hparams.image["size"] == [64, 64]
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    hp = load_checkpoint(ckpt)["hyper_parameters"]

    def walk(x):
        assert not isinstance(x, Container)
        for v in x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ():
            walk(v)

    walk(hp)  # omegaconf containers come back as plain dicts/lists


def test_checkpoints_with_omegaconf_hparams_load_as_plain_containers(trained, tmp_path):
    # Checkpoints saved before VQAModule stored plain containers hold Hydra's DictConfig/ListConfig.
    _, ckpt, _ = trained
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    old["hyper_parameters"]["image"] = OmegaConf.create(old["hyper_parameters"]["image"])
    old["hyper_parameters"]["milestones"] = OmegaConf.create(list(old["hyper_parameters"]["milestones"]))
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    with pytest.raises(Exception, match="omegaconf"):
        torch.load(path, map_location="cpu", weights_only=True)  # plain weights-only refuses it
    loaded = load_model(path)
    # stored resolved: the normalisation of the (random) backbone weights, detectron2's default
    assert loaded.hparams.image == {"size": [64, 64], "short": None, "max_size": None, "norm": "detectron2",
                                    "mean": [103.53, 116.28, 123.675], "std": [1.0, 1.0, 1.0], "hflip": 0.0}
    assert type(loaded.hparams.image) is dict and type(loaded.hparams.milestones) is list


def test_missing_checkpoint_names_path_and_command(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_model(tmp_path / "nope.ckpt")
    assert str(tmp_path / "nope.ckpt") in str(e.value) and TRAIN_HINT in str(e.value)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_are_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Evil(marker)}}, bad)
    with pytest.raises(DataError, match="refused by torch's weights-only loader"):
        load_checkpoint(bad)
    assert not marker.exists()
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.ckpt"):
        load_checkpoint(junk)


# -- evaluate -------------------------------------------------------------------------------------


def test_evaluate_cli_val_prints_the_official_scores(trained, tmp_path):
    root, ckpt, _ = trained
    out = tmp_path / "res.json"
    r = _run("gridvqa.evaluate", f"ckpt_path={ckpt}", f"paths.data_root={root}", f"paths.log_dir={tmp_path}",
             "split=val", f"out={out}", "num_workers=0", "device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    qpath, apath = layout.questions_path(root, "val"), layout.annotations_path(root, "val")
    assert printed == vqa_eval.evaluate(qpath, apath, out)
    assert set(printed) == {"overall", "perAnswerType", "perQuestionType"}
    # the scores are kept beside the results, named as the official tool names them
    assert json.loads((tmp_path / "res_accuracy.json").read_text()) == printed
    assert f"accuracy: {tmp_path / 'res_accuracy.json'}" in r.stderr
    ids = [q["question_id"] for q in read_questions(qpath)]
    assert [r["question_id"] for r in vqa_eval.load_results(out)] == ids


def test_evaluate_test_split_covers_every_question(trained, tmp_path):
    root, _, model = trained
    res = evaluate_split(model, root, split="test", output_dir=tmp_path)
    assert res.scores is None and res.split == "test2015" and res.answered_blind == 0
    assert res.results_path == tmp_path / "vqa_OpenEnded_mscoco_test2015_gridvqa_results.json"
    ids = {q["question_id"] for q in read_questions(layout.questions_path(root, "test"))}
    written = vqa_eval.load_results(res.results_path)
    assert {r["question_id"] for r in written} == ids and len(written) == len(ids)
    assert all(r["answer"] in model.answers for r in written)
    assert str(res.results_path) in res.summary() and "EvalAI" in res.summary()


def test_evaluate_answers_questions_of_unreadable_images(trained, tmp_path):
    root, _, model = trained
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    broken = _image(copy)
    broken.write_bytes(broken.read_bytes()[:50])  # truncated jpeg
    res = evaluate_split(model, copy, split="val", out=tmp_path / "r.json")
    qs = read_questions(layout.questions_path(copy, "val"))
    on_broken = sum(q["image_id"] == qs[0]["image_id"] for q in qs)
    assert res.answered_blind == on_broken > 0
    assert res.num_questions == len(qs) and res.scores is not None


def test_evaluate_rejects_a_wrong_split_and_data_root(trained, tmp_path):
    root, _, model = trained
    with pytest.raises(ConfigError, match="split='validation'.*val, test"):
        evaluate_split(model, root, split="validation")
    with pytest.raises(ConfigError, match="nowhere: data root not found"):
        evaluate_split(model, tmp_path / "nowhere", split="val")


def test_evaluate_cli_missing_checkpoint_exits_1(tmp_path):
    r = _run("gridvqa.evaluate", f"ckpt_path={tmp_path / 'no.ckpt'}", f"paths.data_root={tmp_path}",
             f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert err[-1] == f"error: {tmp_path / 'no.ckpt'}: checkpoint not found (train one with: {TRAIN_HINT})"


# -- predict --------------------------------------------------------------------------------------


def test_predict_returns_sorted_topk_and_the_cli_agrees(trained, tmp_path):
    root, ckpt, model = trained
    image, question = _image(root), "what color is the circle?"
    top = predict(ckpt, image, question, topk=3)
    assert len(top) == 3 and len({a for a, _ in top}) == 3
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert all(a in model.answers for a, _ in top)
    # the in-memory module gives the same answers; its training mode is given back
    model.train()
    same = predict(model, image, question, topk=3)
    assert model.training
    model.eval()
    assert [a for a, _ in same] == [a for a, _ in top]
    assert [s for _, s in same] == pytest.approx(scores, abs=1e-5)
    assert len(predict(model, image, question, topk=10_000)) == len(model.answers)

    r = _run("gridvqa.predict", f"ckpt_path={ckpt}", f"image={image}", f"question={question}", "topk=3",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln.split(None, 1) for ln in r.stdout.strip().splitlines()]
    assert [a for _, a in lines] == [a for a, _ in top]
    assert [float(s) for s, _ in lines] == pytest.approx(scores, abs=1e-4)
    assert not list(tmp_path.iterdir())  # predict leaves no log folder behind


def test_predict_errors(trained, tmp_path):
    root, _, model = trained
    image = _image(root)
    for q in ("", "   "):
        with pytest.raises(ConfigError, match="question is empty"):
            predict(model, image, q)
    with pytest.raises(ConfigError, match="no words"):
        predict(model, image, "?!")
    with pytest.raises(DataError, match=f"{tmp_path / 'none.jpg'}: image file not found"):
        predict(model, tmp_path / "none.jpg", "what color?")
    junk = tmp_path / "junk.jpg"
    junk.write_text("hello")
    with pytest.raises(DataError, match="junk.jpg: not a recognised image format"):
        predict(model, junk, "what color?")


def test_predict_needs_a_pixels_model(trained):
    root, _, model = trained
    grid_model = VQAModule(source="grid_h5", visual_dim=16, answers=model.answers,
                           tokenizer_json=model.hparams.tokenizer_json)
    with pytest.raises(ConfigError, match="needs a source=pixels model"):
        predict(grid_model, _image(root), "what color is the circle?")
