"""Validation attention pictures (gridvqa.lit.attention_images) in real short trainings: every visual
source, TensorBoard images and csv PNGs, the same questions each epoch, off for detectors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gridvqa.data import layout
from gridvqa.data.features import FeatureWriter
from gridvqa.data.vqa2 import load_split
from gridvqa.errors import ConfigError
from gridvqa.lit.attention_images import ValAttentionImages
from test_experiments import run_experiment
from test_loggers import run_short, tensorboard_tags


def pictures(out: Path, epoch: int) -> list[str]:
    folder = out / "attention" / f"epoch_{epoch:03d}"
    names = sorted(p.name for p in folder.glob("question_*.png"))
    for name in names:
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    return names


def first_val_questions(root: Path, n: int) -> list[str]:
    return sorted(f"question_{e.question_id}.png" for e in load_split(root, "val")[:n])


def write_true_size_features(
    root: Path, kind: str, out_dir: Path, dim: int = 32, wrong_size: bool = False
) -> dict[str, str]:
    """Feature files whose stored image sizes are the real images' (the pictures are drawn on them), or
    not (`wrong_size`); a 3x3 grid as the extractor would write for a fixed 96x96 resize at stride 32."""
    rng = np.random.default_rng(0)
    paths = {}
    for split in ("train", "val"):
        path = out_dir / f"{kind}_{split}.h5"
        prov = {"resize": "fixed 96x96", "output_stride": 32}
        with FeatureWriter(path, kind, prov, overwrite=True) as w:
            for i in sorted({e.image_id for e in load_split(root, split, with_answers=False)}):
                with Image.open(layout.coco_image_path(root, split, i)) as im:
                    hw = (im.height + 1, im.width) if wrong_size else (im.height, im.width)
                if kind == "grid":
                    w.add_grid(i, rng.standard_normal((3, 3, dim)).astype(np.float32), hw)
                else:
                    n = int(rng.integers(5, 10))
                    xy = rng.uniform(0, min(hw) / 2, (n, 2))
                    boxes = np.concatenate([xy, xy + rng.uniform(10, min(hw) / 2, (n, 2))], 1)
                    w.add_region(i, rng.standard_normal((n, dim)).astype(np.float32),
                                 boxes.astype(np.float32), hw)
        paths[split] = str(path)
    return paths


def test_pixels_same_questions_every_epoch_to_tensorboard_and_png(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    run_short(tiny_shapes, out, ["logger=many", "~logger.wandb", "callbacks.val_attention.num=2"], epochs=2)
    want = first_val_questions(tiny_shapes, 2)
    assert pictures(out, 0) == want and pictures(out, 1) == want
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["images"] if t.startswith("val/attention/")]
    assert sorted(t.rsplit("/", 1)[1] + ".png" for t in tags) == want
    steps = [ev.step for ev in acc.Images(tags[0])]
    assert len(steps) == 2 and steps[0] < steps[1]  # one picture per epoch at its global step


def test_tensorboard_alone_writes_no_png_chosen_question(tiny_shapes, tmp_path):
    qid = load_split(tiny_shapes, "val")[5].question_id
    out = tmp_path / "run"
    run_short(tiny_shapes, out, ["logger=tensorboard", f"callbacks.val_attention.question_ids=[{qid}]"])
    tags = [t for t in tensorboard_tags(out / "tensorboard")["images"] if t.startswith("val/")]
    assert tags == [f"val/attention/question_{qid}"]
    assert not (out / "attention").exists()


@pytest.mark.parametrize("source", ["grid_h5", "region_h5"])
def test_feature_file_sources(source, tiny_shapes, tmp_path):
    kind = "grid" if source == "grid_h5" else "region"
    feats = write_true_size_features(tiny_shapes, kind, tmp_path / "features")
    out = tmp_path / "run"
    overrides = ["logger=csv", "callbacks.val_attention.num=2",
                 f"data.features.train={feats['train']}", f"data.features.val={feats['val']}"]
    run_short(tiny_shapes, out, overrides, experiment="frozen_h5" if source == "grid_h5" else "region")
    assert pictures(out, 0) == first_val_questions(tiny_shapes, 2)


def test_unreadable_picture_is_skipped_not_fatal(tiny_shapes, tmp_path, caplog):
    """Stored sizes that do not match the image on disk: that picture is skipped with a warning, the
    training goes on."""
    feats = write_true_size_features(tiny_shapes, "grid", tmp_path / "features", wrong_size=True)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="gridvqa.lit.attention_images"):
        acc = run_short(tiny_shapes, out, ["logger=csv", "callbacks.val_attention.num=1",
                                           f"data.features.train={feats['train']}",
                                           f"data.features.val={feats['val']}"],
                        experiment="frozen_h5")
    assert acc is not None
    assert "attention picture of question" in caplog.text and "skipped" in caplog.text
    assert pictures(out, 0) == []


def test_fast_dev_run_draws_one_question(tiny_shapes, tmp_path):
    run_experiment("frozen_random", tiny_shapes, tmp_path / "artifacts", tmp_path)
    assert len(pictures(tmp_path, 0)) == 1


def test_detector_pretraining_leaves_it_off(tiny_shapes, tmp_path):
    run_experiment("pretrain_vg", tiny_shapes, tmp_path / "artifacts", tmp_path)
    assert (tmp_path / "artifacts" / "pretrain_vg" / "model.ckpt").is_file()
    assert not (tmp_path / "attention").exists()


@pytest.mark.parametrize("kwargs", [{"num": 0}, {"which": "mean"}, {"every_n_epochs": 0}])
def test_bad_settings_are_one_line_errors(kwargs):
    with pytest.raises(ConfigError, match="ValAttentionImages"):
        ValAttentionImages(**kwargs)
