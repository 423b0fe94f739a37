"""One LightningModule for every VQA setting: the *visual source* is what changes.

- `pixels`: the ResNet backbone is in the graph (trainable = end-to-end / fine-tuned, frozen = frozen
  grid on the fly); gradients from the answer loss reach the pixels' features.
- `grid_h5` / `region_h5`: pre-extracted grid or region features from HDF5.

Checkpoints are self-contained: the answer list, the tokenizer (its json) and the image settings are
hyper-parameters, so evaluation and prediction need only the checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from gridvqa.config import to_plain
from gridvqa.data.images import feature_mask
from gridvqa.errors import ConfigError
from gridvqa.metrics.vqa_metric import VQAAccuracy
from gridvqa.models.mcan import MCANOutput, build_mcan

log = logging.getLogger(__name__)

SOURCES = ("pixels", "grid_h5", "region_h5")


def mcan_lr_factor(progress: float, warmup: float, milestones: Sequence[float], gamma: float) -> float:
    """MCAN's schedule on the fraction of training done: warm-up in 4 equal steps (1/4, 2/4, 3/4, 1)
    over the first `warmup` fraction, then x`gamma` at each milestone fraction. Fractions (not epochs)
    so the same config fits 13 epochs of VQA v2 and a few minutes on the built-in data."""
    if progress < warmup:
        return (math.floor(4 * progress / warmup) + 1) / 4
    return gamma ** sum(progress >= m for m in milestones)


class VQAModule(pl.LightningModule):
    def __init__(
        self,
        source: str = "pixels",
        head: dict[str, Any] | None = None,
        num_answers: int | None = None,
        answers: list[str] | None = None,
        answers_path: str | None = None,
        tokenizer_json: str | None = None,
        tokenizer_dir: str | None = None,
        backbone: dict[str, Any] | None = None,
        backbone_trainable: bool = True,
        backbone_feature: str = "res5",
        visual_dim: int | None = None,
        image: dict[str, Any] | None = None,
        init_from: str | None = None,
        lr: float = 1e-4,
        backbone_lr_mult: float = 0.1,
        weight_decay: float = 0.0,
        backbone_weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-9,
        warmup: float = 3 / 13,
        milestones: Sequence[float] = (10 / 13, 12 / 13),
        gamma: float = 0.2,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ConfigError(f"model.source={source!r}: expected one of {SOURCES}")
        head, backbone, image, milestones, betas = map(to_plain, (head, backbone, image, milestones, betas))
        answers = list(answers) if answers is not None else _load_answers(answers_path)
        tokenizer_json = tokenizer_json or _load_tokenizer_json(tokenizer_dir)
        self.save_hyperparameters(ignore=["answers_path", "tokenizer_dir", "init_from"])
        # Checkpoints carry the vocabulary and tokenizer themselves, not paths to them.
        self.hparams["answers"], self.hparams["tokenizer_json"] = answers, tokenizer_json
        self.answers = answers
        self.tokenizer = tokenizer_from_json(tokenizer_json)
        if num_answers is not None and num_answers != len(answers):
            raise ConfigError(f"num_answers={num_answers} but the answer vocabulary has {len(answers)}")

        self.backbone = None
        if source == "pixels":
            if backbone is None:
                raise ConfigError("model.source=pixels needs a backbone config")
            self.backbone = _build_backbone(dict(backbone))
            shape = self.backbone.output_shape()[backbone_feature]
            visual_dim, self.stride = shape.channels, shape.stride
            self.backbone.requires_grad_(backbone_trainable)
        elif visual_dim is None:
            raise ConfigError(f"model.source={source} needs model.visual_dim (the stored feature width)")
        self.head = build_mcan(
            **dict(head or {"size": "tiny"}),
            num_answers=len(answers),
            visual_dim=int(visual_dim),
            vocab_size=len(self.tokenizer),
            visual_kind="region" if source == "region_h5" else "grid",
            pad_id=self.tokenizer.pad_token_id or 0,
        )
        self.val_acc = VQAAccuracy(per_answer_type=True)
        if init_from:
            self.load_vqa_weights(init_from)

    # -- model ------------------------------------------------------------------------------------
    def visual_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, mask, normalised boxes or None) for the head, from whichever source the batch has."""
        src = self.hparams.source
        if src == "pixels":
            images = batch["images"]
            if self.hparams.backbone.get("channels_last"):
                images = images.contiguous(memory_format=torch.channels_last)
            trainable = self.hparams.backbone_trainable and self.training
            with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
                feats = self.backbone(images)[self.hparams.backbone_feature]
            mask = feature_mask(batch["pixel_mask"], feats.shape[-2:], stride=self.stride)
            return feats, mask, None
        if src == "grid_h5":
            return batch["grid"].permute(0, 3, 1, 2), batch["grid_mask"], None
        hw = batch["orig_size"].to(batch["boxes"].dtype)  # (h, w) per image
        boxes = batch["boxes"] / torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)[:, None, :]
        return batch["regions"], batch["region_mask"], boxes

    def forward(self, batch: dict, return_attention: bool = False) -> torch.Tensor | MCANOutput:
        feats, mask, boxes = self.visual_inputs(batch)
        # Visual inputs come once per image; each question takes its image's (no copy when 1:1).
        idx = batch["img_index"]
        if idx.numel() != feats.shape[0] or not torch.equal(idx, torch.arange(len(idx), device=idx.device)):
            feats, mask = feats[idx], mask[idx]
            boxes = boxes[idx] if boxes is not None else None
        return self.head(
            batch["q_ids"], batch["q_mask"], feats, mask, boxes=boxes, return_attention=return_attention
        )

    def train(self, mode: bool = True) -> VQAModule:
        super().train(mode)
        if self.backbone is not None and not self.hparams.backbone_trainable:
            self.backbone.eval()  # a frozen backbone keeps eval behaviour (no dropout / BN updates)
        return self

    # -- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every question of the batch had an unreadable image (logged and counted)
            return None
        logits = self(batch)
        # BCE on soft scores, summed over answers, averaged over questions (bottom-up / MCAN scale).
        loss = F.binary_cross_entropy_with_logits(logits, batch["target"], reduction="sum") / logits.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def predict_answers(self, logits: torch.Tensor) -> list[str]:
        return [self.answers[i] for i in logits.argmax(-1).tolist()]

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        logits = self(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch["target"], reduction="sum") / logits.shape[0]
        self.log("val/loss", loss, batch_size=logits.shape[0], sync_dist=True)
        self.val_acc.update(self.predict_answers(logits), batch["answers"], batch["answer_type"])

    def on_validation_epoch_end(self) -> None:
        out = self.val_acc.compute()  # already summed over processes: the mean of equal values is a no-op
        self.log("val/vqa_acc", 100 * out["overall"], prog_bar=True, sync_dist=True)
        for k in ("yes_no", "number", "other"):
            self.log(f"val/vqa_acc_{k}", 100 * out[k], sync_dist=True)
        self.val_acc.reset()

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        head = [p for p in self.head.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if self.backbone is not None and hp.backbone_trainable:
            bb = [p for p in self.backbone.parameters() if p.requires_grad]
            decay = [p for p in bb if p.ndim > 1]
            no_decay = [p for p in bb if p.ndim <= 1]
            lr_bb = hp.lr * hp.backbone_lr_mult
            groups += [
                {"params": decay, "lr": lr_bb, "weight_decay": hp.backbone_weight_decay},
                {"params": no_decay, "lr": lr_bb, "weight_decay": 0.0},
            ]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.Adam(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:
            return mcan_lr_factor(step / total, hp.warmup, tuple(hp.milestones), hp.gamma)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def load_vqa_weights(self, path: str) -> None:
        """Start from another VQA checkpoint's weights (e.g. `finetune` from a frozen run)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"{p}: VQA checkpoint to start from not found (train one with: python -m gridvqa.train "
                "experiment=frozen)"
            )
        state = torch.load(p, map_location="cpu", weights_only=True)["state_dict"]
        state = {k: v for k, v in state.items() if not k.startswith("val_acc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("val_acc.")]
        if missing or unexpected:
            log.warning("init_from %s: missing %s, unexpected %s", p, missing, unexpected)


def _build_backbone(cfg: dict[str, Any]):
    from gridvqa.models.backbone import build_backbone

    weights = cfg.get("weights")
    if weights and not Path(weights).is_file():
        raise ConfigError(
            f"{weights}: pre-trained backbone not found (make it with: python -m gridvqa.train "
            "experiment=pretrain_vg)"
        )
    return build_backbone(**cfg)


def _load_answers(path: str | None) -> list[str]:
    from gridvqa.data.vqa2 import AnswerVocab

    if path is None:
        raise ConfigError("model needs `answers` or `answers_path`")
    return AnswerVocab.load(path).answers


def _load_tokenizer_json(directory: str | None) -> str:
    if directory is None:
        raise ConfigError("model needs `tokenizer_json` or `tokenizer_dir`")
    f = Path(directory) / "tokenizer.json"
    if not f.is_file():
        raise ConfigError(
            f"{f}: tokenizer not found (make it with: python -m gridvqa.data.prepare DATA_ROOT)"
        )
    return f.read_text(encoding="utf-8")


def tokenizer_from_json(text: str):
    """The PreTrainedTokenizerFast saved in a checkpoint."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from gridvqa.data.text import PAD, UNK

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), pad_token=PAD, unk_token=UNK)
