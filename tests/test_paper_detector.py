"""The paper-scale detector pre-training files compose to the reference recipe (grid-feats-vqa
Base-RCNN-grid / Base-RCNN-updn, bottom-up-attention's ResNet-101 C4), and refuse to train from random
weights with FrozenBN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gridvqa.errors import ConfigError
from gridvqa.lit.detection_module import DetectionModule
from gridvqa.models.backbone import build_backbone
from gridvqa.models.detector import build_detector
from hydra_utils import compose_cfg


def paper_cfg(name: str, root: Path, tmp_path: Path):
    return compose_cfg([f"experiment={name}"], root, tmp_path)


def tiny_detector(cfg):
    """The file's detector settings on a tiny backbone with the file's layout (dilation, output map)."""
    bb = build_backbone("R-tiny", norm="BN", freeze_at=0, res5_dilation=cfg.backbone.res5_dilation,
                        out_features=list(cfg.backbone.out_features))
    return build_detector(cfg.model.kind, bb, 3, 2, **OmegaConf.to_container(cfg.model.detector))


@pytest.mark.parametrize("name, arch, stride_in_1x1", [
    ("pretrain_vg_paper", "X-101-32x8d", False),      # grid-feats-vqa configs/X-101-grid.yaml
    ("pretrain_vg_paper_r50", "R-50", True),          # configs/R-50-grid.yaml (MSRA weights)
])
def test_grid_paper_files_are_base_rcnn_grid(name, arch, stride_in_1x1, tiny_shapes, tmp_path):
    cfg = paper_cfg(name, tiny_shapes, tmp_path)
    assert (cfg.backbone.name, cfg.backbone.stride_in_1x1) == (arch, stride_in_1x1)
    assert (cfg.backbone.norm, cfg.backbone.freeze_at, cfg.backbone.res5_dilation) == ("FrozenBN", 2, 2)
    assert cfg.backbone.weights is None  # the user names the ImageNet weights
    assert (list(cfg.data.train_short), cfg.data.test_short, cfg.data.max_size) == ([600], 600, 1000)
    assert cfg.data.batch_size == 16 and cfg.model.lr == 0.02 and cfg.trainer.max_steps == 90000
    assert list(cfg.model.milestones) == [60000, 80000]
    root = Path(cfg.paths.data_root) / "vg"
    assert [list(cfg.data.split_files.train), list(cfg.data.split_files.val)] == [
        [str(root / "train.txt"), str(root / "val.txt")], [str(root / "test.txt")]]
    assert cfg.data.exclude_vqa_val is False
    det = tiny_detector(cfg)
    assert det.rpn.boundary_thresh == 0
    assert (det.pooler_resolution, det.sampling_ratio, det.roi_heads.smooth_l1_beta) == (1, 2, 1.0)


def test_c4_paper_file_is_bottom_up_resnet101_with_updn_settings(tiny_shapes, tmp_path):
    cfg = paper_cfg("pretrain_vg_c4_paper", tiny_shapes, tmp_path)
    assert (cfg.backbone.name, cfg.backbone.stride_in_1x1, cfg.backbone.norm) == ("R-101", True, "FrozenBN")
    assert (cfg.backbone.res5_dilation, list(cfg.backbone.out_features)) == (1, ["res4"])
    assert cfg.task_name == "pretrain_vg_c4_paper" and cfg.model.kind == "c4"
    det = tiny_detector(cfg)
    assert det.rpn.boundary_thresh == -1  # Base-RCNN-updn leaves detectron2's default
    assert (det.pooler_resolution, det.sampling_ratio, det.roi_heads.smooth_l1_beta) == (14, 2, 1.0)
    assert det.roi_heads.fg_bg_sampler.batch_size_per_image == 512


def test_cpu_pretraining_keeps_its_own_settings(tiny_shapes, tmp_path):
    """The paper values live in the paper files: the CPU recipe (make train) is unchanged."""
    for name, beta, ratio in (("pretrain_vg", 1.0, 2), ("pretrain_vg_c4", 0.0, 0)):
        cfg = paper_cfg(name, tiny_shapes, tmp_path)
        det = tiny_detector(cfg)
        assert det.rpn.boundary_thresh == -1 and cfg.data.split_files is None and cfg.data.exclude_vqa_val
        assert (det.sampling_ratio, det.roi_heads.smooth_l1_beta) == (ratio, beta)


def test_paper_e2e_r50_loads_the_r50_pretraining(tiny_shapes, tmp_path):
    cfg = paper_cfg("paper_e2e_r50_600", tiny_shapes, tmp_path)
    assert cfg.backbone.name == "R-50"
    weights = Path(cfg.backbone.weights)
    assert weights == Path(cfg.paths.artifacts_dir) / "pretrain_vg_paper_r50" / "backbone.safetensors"
    r50 = paper_cfg("pretrain_vg_paper_r50", tiny_shapes, tmp_path)
    assert Path(r50.model.export_dir).name == "pretrain_vg_paper_r50"  # where that pre-training publishes


def test_frozen_bn_without_weights_is_refused():
    with pytest.raises(ConfigError, match=r"backbone.norm=FrozenBN needs backbone.weights"):
        DetectionModule("grid", dict(name="R-tiny", norm="FrozenBN", freeze_at=2), dict(fc_dim=16), 3, 2)
    with pytest.raises(ConfigError, match=r"backbone.weights"):
        DetectionModule("grid", dict(name="R-tiny"), dict(fc_dim=16), 3, 2)  # FrozenBN is the default norm
    DetectionModule("grid", dict(name="R-tiny", norm="BN", freeze_at=0), dict(fc_dim=16), 3, 2)


@pytest.mark.slow  # a whole `python -m gridvqa.train` start-up
def test_paper_pretraining_without_weights_stops_in_one_line(tiny_shapes, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    res = subprocess.run(
        [sys.executable, "-m", "gridvqa.train", "experiment=pretrain_vg_paper", "trainer=cpu", "logger=csv",
         f"paths.data_root={tiny_shapes}", f"paths.log_dir={tmp_path / 'logs'}",
         f"paths.artifacts_dir={tmp_path / 'artifacts'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "backbone.norm=FrozenBN" in err[0] and "backbone.weights" in err[0], err
    assert not (tmp_path / "artifacts" / "pretrain_vg_paper").exists()
