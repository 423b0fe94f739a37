"""Every file in conf/experiment/ composes, instantiates and runs one train + one val batch
(fast_dev_run) on the tiny built-in set, with paper-scale sizes shrunk to CPU size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ckpt_utils import write_vqa_checkpoint
from feature_files import write_features
from gridvqa.training import run
from hydra_utils import EXPERIMENTS, compose_cfg


def shrink(cfg) -> None:
    """Same code paths, CPU sizes: tiny backbone and head, small images, no workers."""
    with open_dict(cfg):
        cfg.backbone.name = "R-tiny"
        cfg.backbone.stride_in_1x1 = False
        if cfg.backbone.get("weights"):  # paper files point at converted checkpoints: use the test's
            cfg.backbone.weights = str(Path(cfg.paths.artifacts_dir) / "pretrain_vg" / "backbone.safetensors")
        cfg.backbone.grad_checkpointing = False
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.precision = "32-true"
        cfg.trainer.pop("val_check_interval", None)
        cfg.trainer.check_val_every_n_epoch = 1
        cfg.data.num_workers = 0
        cfg.data.batch_size = 2
        if cfg.data._target_.endswith("VGDataModule"):
            cfg.data.train_short, cfg.data.test_short, cfg.data.max_size = 96, 96, 128
            cfg.model.detector.fc_dim = 64
            cfg.model.detector.anchor_sizes = [16, 32, 64]
            cfg.model.detector.batch_size_per_image = 32
            cfg.data.split_files = None  # the built-in set has no bottom-up split lists
            if cfg.backbone.norm == "FrozenBN":  # paper pre-training needs ImageNet weights: use the test's
                cfg.backbone.weights = str(Path(cfg.paths.artifacts_dir) / "pretrain_vg/backbone.safetensors")
        else:
            cfg.data.image_size, cfg.data.short, cfg.data.max_size = [96, 96], None, None
            cfg.data.num_workers = 0
            cfg.data.val_batch_size = 2
            cfg.model.head = {"size": "tiny"}
            if cfg.model.source != "pixels":
                cfg.data.batch_size = 4


def write_pretrained_backbone(artifacts: Path) -> None:
    """What `experiment=pretrain_vg` exports, made directly (a trained one is not needed to run)."""
    from gridvqa.models.backbone import build_backbone
    from gridvqa.models.weights import save_safetensors

    torch.manual_seed(0)
    bb = build_backbone("R-tiny", norm="BN", freeze_at=0)
    sd = {k: v for k, v in bb.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_safetensors(sd, artifacts / "pretrain_vg" / "backbone.safetensors")


def experiment_cfg(name: str, root: Path, artifacts: Path, out: Path):
    cfg = compose_cfg([f"experiment={name}", "debug=fdr", "logger=csv"], root, out)
    with open_dict(cfg):
        cfg.paths.artifacts_dir = str(artifacts)
        cfg.paths.log_dir = str(out / "logs")
    shrink(cfg)
    return cfg


def run_experiment(name: str, root: Path, artifacts: Path, out: Path) -> float | None:
    return run(experiment_cfg(name, root, artifacts, out))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifacts")
    write_pretrained_backbone(d)
    return d


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_fast_dev_run(name, tiny_shapes, artifacts, tmp_path):
    if "region" in name or "frozen_h5" in name or "frozen_x152" in name:
        kind = "region" if "region" in name else "grid"
        for split in ("train", "val"):
            if not (tiny_shapes / "features" / f"{kind}_{split}.h5").is_file():
                write_features(tiny_shapes, kind, split)
    cfg = experiment_cfg(name, tiny_shapes, artifacts, tmp_path)
    if cfg.model.get("init_from"):  # the model it starts from (`experiment=frozen`'s), written here
        start = experiment_cfg("frozen", tiny_shapes, artifacts, tmp_path / "frozen")
        with open_dict(cfg):
            cfg.model.init_from = str(write_vqa_checkpoint(start, tmp_path / "frozen.ckpt"))
    published = artifacts / cfg.task_name / "model.ckpt"
    assert not published.exists()
    run(cfg)
    assert published.is_file()  # a debug run publishes only where no model is (tests: a fresh folder)
