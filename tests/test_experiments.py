"""Every file in conf/experiment/ composes, instantiates and runs one train + one val batch on the tiny
built-in set at `debug=tiny` (the smallest sizes; a paper file keeps its setting, schedule, head kind and
resize rule), with the inputs each one reads (pre-trained weights, GloVe vectors, feature files, VG split
lists) written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from ckpt_utils import write_vqa_checkpoint
from feature_files import write_features
from gridvqa.training import run
from hydra_utils import EXPERIMENTS, compose_cfg

# where the experiment files look for VG-pretrained backbones (size=vqa_cpu, vqa_x101_448, vqa_r50_600)
PRETRAINED = ("pretrain_vg", "pretrain_vg_paper", "pretrain_vg_paper_r50")


def write_pretrained_backbone(artifacts: Path) -> None:
    """What `experiment=pretrain_vg` exports, made directly (a trained one is not needed to run), at every
    place an experiment file reads a VG-pretrained backbone from."""
    from gridvqa.models.backbone import build_backbone
    from gridvqa.models.weights import save_safetensors

    torch.manual_seed(0)
    bb = build_backbone("R-tiny", norm="BN", freeze_at=0)
    sd = {k: v for k, v in bb.state_dict().items() if not k.endswith("num_batches_tracked")}
    for task in PRETRAINED:
        save_safetensors(sd, artifacts / task / "backbone.safetensors")


def write_glove(root: Path, dim: int = 300) -> None:
    """DATA_ROOT/glove/glove.840B.300d.txt (what the paper sizes read) for a few words of the built-in set."""
    path = root / "glove" / "glove.840B.300d.txt"
    if path.is_file():
        return
    rng = np.random.default_rng(0)
    words = ["what", "color", "is", "the", "how", "many", "circle", "square", "red", "blue", "?"]
    lines = [" ".join([w, *(f"{v:.4f}" for v in rng.standard_normal(dim))]) for w in words]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_vg_split_lists(root: Path) -> None:
    """bottom-up-attention's vg/{train,val,test}.txt (what the paper pre-training reads), one id a line."""
    if (root / "vg" / "test.txt").is_file():
        return
    ids = sorted(int(d["image_id"]) for d in json.loads((root / "vg" / "image_data.json").read_text()))
    parts = {"train": ids[: len(ids) // 2], "val": ids[len(ids) // 2: -4], "test": ids[-4:]}
    for name, part in parts.items():
        (root / "vg" / f"{name}.txt").write_text("".join(f"{i}\n" for i in part), encoding="utf-8")


def write_inputs(name: str, root: Path) -> None:
    """The files experiment `name` reads from the data root, beyond the built-in set itself."""
    if "region" in name or "frozen_h5" in name or "frozen_x152" in name:
        kind = "region" if "region" in name else "grid"
        for split in ("train", "val"):
            if not (root / "features" / f"{kind}_{split}.h5").is_file():
                write_features(root, kind, split)
    if name.startswith("paper_"):
        write_glove(root)
    if name.startswith("pretrain_") and "paper" in name:
        write_vg_split_lists(root)


def experiment_cfg(name: str, root: Path, artifacts: Path, out: Path):
    overrides = [f"experiment={name}", "debug=tiny", "logger=csv"]
    if name.startswith("pretrain_") and "paper" in name:
        # FrozenBN fine-tunes ImageNet weights there: the test's R-tiny export stands in for them
        overrides.append(f"backbone.weights={artifacts / 'pretrain_vg' / 'backbone.safetensors'}")
    cfg = compose_cfg(overrides, root, out)
    with open_dict(cfg):
        cfg.paths.artifacts_dir = str(artifacts)
        cfg.paths.log_dir = str(out / "logs")
    return cfg


def run_experiment(name: str, root: Path, artifacts: Path, out: Path) -> float | None:
    write_inputs(name, root)
    return run(experiment_cfg(name, root, artifacts, out))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifacts")
    write_pretrained_backbone(d)
    return d


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_at_debug_tiny(name, tiny_shapes, artifacts, tmp_path):
    write_inputs(name, tiny_shapes)
    cfg = experiment_cfg(name, tiny_shapes, artifacts, tmp_path)
    if cfg.model.get("init_from"):  # the model it starts from (`experiment=frozen`'s), written here
        start = experiment_cfg("frozen", tiny_shapes, artifacts, tmp_path / "frozen")
        with open_dict(cfg):
            cfg.model.init_from = str(write_vqa_checkpoint(start, tmp_path / "frozen.ckpt"))
    published = artifacts / cfg.task_name / "model.ckpt"
    assert not published.exists()
    run(cfg)
    assert published.is_file()  # a debug run publishes only where no model is (tests: a fresh folder)


@pytest.mark.parametrize("name", ["paper_e2e_r50_600", "paper_frozen_x152_large", "pretrain_vg_c4_paper"])
def test_debug_tiny_keeps_what_the_size_means(name, tiny_shapes, tmp_path):
    """debug=tiny shrinks; the schedule, head kind, resize rule and detector kind stay the paper's."""
    full = compose_cfg([f"experiment={name}"], tiny_shapes, tmp_path)
    tiny = compose_cfg([f"experiment={name}", "debug=tiny"], tiny_shapes, tmp_path)
    assert tiny.backbone.name == "R-tiny" and tiny.data.batch_size == 2 and tiny.trainer.fast_dev_run
    assert tiny.trainer.accelerator == "cpu" and tiny.trainer.precision == "32-true"
    if tiny.model.get("head"):
        assert tiny.model.head.size == "tiny" and tiny.data.image_size == [96, 96]
        for key in ("position_encoding", "box_embedding", "layer_norm", "glove_path"):
            assert tiny.model.head[key] == full.model.head[key]
        for key in ("schedule", "warmup_epochs", "decay_epochs", "gamma", "lr", "betas", "eps"):
            assert tiny.model[key] == full.model[key]
        assert (tiny.data.short, tiny.data.max_size) == (full.data.short, full.data.max_size)
    else:
        assert tiny.model.kind == full.model.kind == "c4" and tiny.data.max_size == 128
        assert tiny.model.detector.pooler_resolution == full.model.detector.pooler_resolution
        assert tiny.data.split_files == full.data.split_files
