"""One LightningModule for every VQA setting: the *visual source* is what changes.

- `pixels`: the ResNet backbone is in the graph (trainable = end-to-end / fine-tuned, frozen = frozen
  grid on the fly); gradients from the answer loss reach the pixels' features.
- `grid_h5` / `region_h5`: pre-extracted grid or region features from HDF5.

Checkpoints are self-contained: the answer list, the tokenizer (its json) and the image settings are
hyper-parameters, so evaluation and prediction need only the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from gridvqa.config import to_plain
from gridvqa.data.images import feature_mask, normalize_batch, resize_batch_uint8, resolve_image_spec
from gridvqa.errors import ConfigError, DataError
from gridvqa.lit.schedules import VQA_SCHEDULES, fraction_factor, mcan_epoch_factor
from gridvqa.metrics.vqa_metric import VQAAccuracy
from gridvqa.models.mcan import MCANOutput, build_mcan, mcan_config

log = logging.getLogger(__name__)

SOURCES = ("pixels", "grid_h5", "region_h5")


# Head defaults a checkpoint relied on when its head hyper-parameters lack `layer_norm`: every head
# written since stores all its fields, so only such checkpoints need them to be rebuilt as trained.
_IMPLICIT_HEAD = {"position_encoding": "sine", "box_embedding": True, "layer_norm": "torch"}
_RENAMED_HEAD = {"pos_enc": "position_encoding", "use_boxes": "box_embedding"}


def head_hparams_from_checkpoint(head: dict[str, Any] | None) -> dict[str, Any]:
    """A checkpoint's `head` hyper-parameters as today's MCAN config takes them (see _IMPLICIT_HEAD)."""
    head = dict(head or {"size": "tiny"})
    if "layer_norm" in head:
        return head
    for old, new in _RENAMED_HEAD.items():
        if old in head:
            head[new] = head.pop(old)
    for key, value in _IMPLICIT_HEAD.items():
        head.setdefault(key, value)
    if head.get("size", "small") == "large":
        head.setdefault("heads", 16)
    return head


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
        backbone_weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-9,
        schedule: str = "fraction",
        warmup: float = 3 / 13,
        milestones: Sequence[float] = (10 / 13, 12 / 13),
        warmup_epochs: int = 3,
        decay_epochs: Sequence[int] = (10, 12),
        gamma: float = 0.2,
        compile_head: bool = False,
    ) -> None:
        """`schedule="mcan"`: mcan-vqa's per-epoch schedule (`warmup_epochs`, `decay_epochs`, in epochs);
        `"fraction"`: the same shape over fractions of the run (`warmup`, `milestones`).
        `compile_head`: torch.compile the MCAN head in place (at its first call; its state_dict keys stay):
        a small head at batch 64 spends its time launching thousands of small kernels."""
        super().__init__()
        if source not in SOURCES:
            raise ConfigError(f"model.source={source!r}: expected one of {SOURCES}")
        if schedule not in VQA_SCHEDULES:
            raise ConfigError(f"model.schedule={schedule!r}: expected one of {VQA_SCHEDULES}")
        head, backbone, image, milestones, decay_epochs, betas = map(
            to_plain, (head, backbone, image, milestones, decay_epochs, betas)
        )
        # Every field of the head goes into the checkpoint: a change of defaults cannot alter a saved model.
        head = dict(head or {"size": "tiny"})
        head_cfg = mcan_config(**head)
        head = {"size": head.get("size", "small"), **dataclasses.asdict(head_cfg)}
        answers = list(answers) if answers is not None else _load_answers(answers_path)
        tokenizer_json = tokenizer_json or _load_tokenizer_json(tokenizer_dir)
        self.save_hyperparameters(ignore=["answers_path", "tokenizer_dir", "init_from"])
        # Checkpoints carry the vocabulary and tokenizer themselves, not paths to them.
        self.hparams["answers"], self.hparams["tokenizer_json"] = answers, tokenizer_json
        self.hparams["head"] = head
        if image is not None and source == "pixels":
            # Stored explicit: a checkpoint normalises pixels as its backbone weights record, without them.
            weights = (backbone or {}).get("weights")
            self.hparams["image"] = resolve_image_spec(image, weights, prefix="model.image.").to_dict()
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
            if not backbone_trainable:
                self.backbone.requires_grad_(False)
            # Trainable: the stages the backbone froze itself (freeze_at) stay frozen.
        elif visual_dim is None:
            raise ConfigError(f"model.source={source} needs model.visual_dim (the stored feature width)")
        self.head = build_mcan(
            head_cfg,
            num_answers=len(answers),
            visual_dim=int(visual_dim),
            vocab_size=len(self.tokenizer),
            visual_kind="region" if source == "region_h5" else "grid",
            vocab=self.tokenizer.get_vocab(),  # word -> embedding row, for head.glove_path
            pad_id=self.tokenizer.pad_token_id or 0,
        )
        if compile_head:
            self.head.compile()
        self.val_acc = VQAAccuracy(per_answer_type=True)
        from torchmetrics.aggregation import SumMetric

        self.val_no_image = SumMetric()  # validation questions whose image could not be read
        if init_from:
            self.load_vqa_weights(init_from)

    # -- model ------------------------------------------------------------------------------------
    def pixels(self, batch: dict) -> torch.Tensor:
        """The batch's images as the backbone takes them; a uint8 batch (data.normalize_on_device) is
        normalised here, on the batch's device, with the normalisation the loader recorded in it, after
        resizing where the loader left that to do (data.resize_on_device)."""
        if "raw_pixels" in batch:
            images = resize_batch_uint8(batch["raw_pixels"], batch["resize_taps"])
        else:
            images = batch["images"]
        if images.dtype == torch.uint8:
            images = normalize_batch(images, batch["pixel_mask"], batch["pixel_norm"])
        if self.hparams.backbone.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def visual_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, mask, normalised boxes or None) for the head, from whichever source the batch has."""
        src = self.hparams.source
        if src == "pixels":
            images = self.pixels(batch)
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

    def on_train_start(self) -> None:
        # Lightning's fit does not call train(); a module fresh from __init__ is in train mode, where a
        # frozen backbone with trainable BN would update its statistics. (Here, not in __init__: after
        # Lightning's check for modules left in eval mode, which would flag this intended one.)
        if self.backbone is not None and not self.hparams.backbone_trainable:
            self.backbone.eval()

    # -- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every question of the batch had an unreadable image (logged and counted)
            return None
        logits = self(batch)
        # BCE on soft scores, summed over answers, averaged over questions. mcan-vqa also sums over the
        # batch (a constant x64): Adam's steps do not change with it, so its learning rates carry over.
        loss = F.binary_cross_entropy_with_logits(logits, batch["target"], reduction="sum") / logits.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def predict_answers(self, logits: torch.Tensor) -> list[str]:
        return [self.answers[i] for i in logits.argmax(-1).tolist()]

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        blind = batch.get("blind")
        if blind:  # no readable image: answered as `evaluate` does (the most frequent answer), still scored
            n = len(blind["answers"])
            self.val_acc.update([self.answers[0]] * n, blind["answers"], blind["answer_type"])
        self.val_no_image.update(float(len(blind["answers"])) if blind else 0.0)  # every rank: compute syncs
        if "q_ids" not in batch:
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
        no_image = int(self.val_no_image.compute())  # summed over processes already
        self.log("val/no_image", float(no_image), sync_dist=True)
        if no_image and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log.warning("validation: %d of %d questions had no readable image; answered %r without it and "
                        "scored (every question of the split counts, as in evaluate)", no_image,
                        int(self.val_acc.count), self.answers[0])
        self.val_acc.reset()
        self.val_no_image.reset()

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
        # AdamW: decay decoupled from the gradient. Adam's L2 decay is divided by the gradient's running
        # scale, so where the answer loss's gradient is small (a pre-trained backbone) it pulls every weight
        # to zero at about the learning rate per step. With no decay (mcan-vqa) the two are the same.
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=0.0)
        if hp.schedule == "mcan":
            warmup_epochs, decay_epochs = int(hp.warmup_epochs), tuple(int(e) for e in hp.decay_epochs)

            def per_epoch(epoch: int) -> float:
                return mcan_epoch_factor(epoch, warmup_epochs, decay_epochs, hp.gamma)

            sched = torch.optim.lr_scheduler.LambdaLR(opt, per_epoch)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def per_step(step: int) -> float:
            return fraction_factor(step / total, hp.warmup, tuple(hp.milestones), hp.gamma)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, per_step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def load_vqa_weights(self, path: str) -> None:
        """Start from another VQA checkpoint's weights (e.g. `finetune` from a frozen run)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"{p}: VQA checkpoint to start from not found (train one with: python -m gridvqa.train "
                "experiment=frozen)"
            )
        from gridvqa.models.safe_load import load_torch_file

        ckpt = load_torch_file(p, "model.init_from checkpoint")  # weights-only: a refused file is one line
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise DataError(f"{p}: model.init_from is not a Lightning VQA checkpoint (no 'state_dict')")
        state = ckpt["state_dict"]
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
    from gridvqa.data.text import read_tokenizer_json

    return read_tokenizer_json(f)


def tokenizer_from_json(text: str):
    """The PreTrainedTokenizerFast saved in a checkpoint."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from gridvqa.data.text import PAD, UNK

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), pad_token=PAD, unk_token=UNK)
