"""Tiny real VQA checkpoints for tests: a pixels model after one Lightning step on Hydra-composed configs
(as `gridvqa.train` builds it) and a region model over a real HDF5 region-feature file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from PIL import Image

from gridvqa.data import layout
from gridvqa.data.features import FeatureWriter
from gridvqa.data.vqa2 import AnswerVocab, load_split
from gridvqa.lit.vqa_module import VQAModule
from hydra_utils import compose_cfg

TINY_PIXELS = ("data.num_workers=0", "data.batch_size=4", "backbone.freeze_at=0")


def train_pixels_checkpoint(
    root: Path, out: Path, overrides: Sequence[str] = ("data.image_size=[64,64]",)
) -> tuple[Path, VQAModule]:
    """One training step of the default (e2e-style) model; the Lightning checkpoint and the module."""
    cfg = compose_cfg([*TINY_PIXELS, *overrides], root, out / "run")
    pl.seed_everything(0)
    model, dm = instantiate(cfg.model), instantiate(cfg.data)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    ckpt = out / "pixels.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, model.eval()


def write_region_features(root: Path, split: str, path: Path, dim: int = 16, seed: int = 0,
                          num_classes: int = 4) -> Path:
    """Random features for each image of `split`, boxes inside the real image (original pixels)."""
    rng = np.random.default_rng(seed)
    ids = sorted({e.image_id for e in load_split(root, split, with_answers=False)})
    with FeatureWriter(path, "region", {"test": "random"}, dtype="float32", overwrite=True) as w:
        for i in ids:
            with Image.open(layout.coco_image_path(root, split, i)) as im:
                width, height = im.size
            n = int(rng.integers(5, 10))
            x0 = rng.uniform(0, width * 0.7, n)
            y0 = rng.uniform(0, height * 0.7, n)
            x1 = np.minimum(x0 + rng.uniform(10, width * 0.5, n), width)
            y1 = np.minimum(y0 + rng.uniform(10, height * 0.5, n), height)
            boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
            w.add_region(i, rng.standard_normal((n, dim)).astype(np.float32), boxes, (height, width),
                         labels=rng.integers(0, num_classes, n).astype(np.int32),
                         scores=rng.uniform(0.2, 1, n).astype(np.float32))
    return path


def region_checkpoint(root: Path, path: Path, dim: int = 16) -> tuple[Path, VQAModule]:
    """An untrained tiny region_h5 model saved in the checkpoint layout `inference.load_model` reads."""
    torch.manual_seed(0)
    tokenizer_json = (layout.tokenizer_dir(root) / "tokenizer.json").read_text(encoding="utf-8")
    answers = AnswerVocab.load(layout.answers_path(root)).answers
    module = VQAModule(source="region_h5", visual_dim=dim, head={"size": "tiny"}, answers=answers,
                       tokenizer_json=tokenizer_json)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path, module.eval()


def write_vqa_checkpoint(cfg, path: Path) -> Path:
    """The untrained model of a composed training config, saved as `PublishCheckpoint` publishes one
    (what `model.init_from` reads), without training it."""
    torch.manual_seed(0)
    torch.save({"state_dict": instantiate(cfg.model).state_dict()}, path)
    return path
