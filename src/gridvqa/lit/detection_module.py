"""LightningModule for Visual Genome detector pre-training (grid 1x1-RoI detector or C4 bottom-up).

Logs `train/loss` and each loss term, validation AP at IoU 0.5 as `val/ap50`, and exports the
backbone and the whole detector as safetensors with the config that built them when training ends. A
`fast_dev_run` (`debug=fdr`) exports only where nothing is exported yet, as PublishCheckpoint publishes.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from gridvqa.config import to_plain
from gridvqa.errors import ConfigError
from gridvqa.lit.schedules import warmup_multistep
from gridvqa.metrics.detection import DetectionAP
from gridvqa.models.backbone import build_backbone
from gridvqa.models.detector import build_detector

log = logging.getLogger(__name__)
# sgd: the detectron2 recipe (default). adamw: a higher AP50 from scratch in few CPU steps (0.23 vs 0.15 in 4
# epochs on the built-in data), though e2e VQA from those weights was not better (docs/results.md).
OPTIMIZERS = ("sgd", "adamw")
# what export_weights writes into export_dir
EXPORT_FILES = ("backbone.safetensors", "detector.safetensors", "config.json")


class DetectionModule(pl.LightningModule):
    def __init__(
        self,
        kind: str,
        backbone: dict[str, Any],
        detector: dict[str, Any],
        num_classes: int,
        num_attributes: int,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_steps: int = 1000,
        milestones: tuple[int, ...] = (60000, 80000),
        gamma: float = 0.1,
        export_dir: str | None = None,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"detector optimizer {optimizer!r} unknown; choose one of {', '.join(OPTIMIZERS)}"
            )
        backbone, detector, milestones = to_plain(backbone), to_plain(detector), to_plain(milestones)
        self.save_hyperparameters()
        self.backbone_cfg = dict(backbone)
        if self.backbone_cfg.get("norm", "FrozenBN") == "FrozenBN" and not self.backbone_cfg.get("weights"):
            # FrozenBN keeps the statistics of pretrained weights; on random weights it normalises nothing.
            raise ConfigError(
                "backbone.norm=FrozenBN needs backbone.weights (ImageNet weights converted with "
                "python -m gridvqa.models.convert); backbone.weights is unset, so the detector would train "
                "from random weights. Set backbone.weights=PATH, or backbone.norm=BN to train from scratch"
            )
        bb = build_backbone(**self.backbone_cfg)
        self.detector = build_detector(kind, bb, num_classes, num_attributes, **dict(detector))
        self.val_ap = DetectionAP(num_classes=num_classes)

    def forward(self, images: torch.Tensor, image_sizes: list) -> list[dict]:
        return self.detector(images, image_sizes)

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable (logged and counted by the dataset)
            return None
        losses = self.detector(batch["images"], batch["image_sizes"], batch["targets"])
        loss = sum(losses.values())
        bs = len(batch["image_sizes"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        return loss

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        preds = self.detector(batch["images"], batch["image_sizes"])
        self.val_ap.update(
            [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds],
            [{k: t[k] for k in ("boxes", "labels")} for t in batch["targets"]],
        )

    def on_validation_epoch_end(self) -> None:
        out = self.val_ap.compute()
        self.log("val/ap50", float(out["ap50"]), prog_bar=True, sync_dist=False)
        self.val_ap.reset()

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.get("optimizer", "sgd") == "adamw":
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        else:
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        fn = partial(
            warmup_multistep, warmup_steps=hp.warmup_steps, milestones=tuple(hp.milestones), gamma=hp.gamma
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if not self.hparams.export_dir or not self.trainer.is_global_zero:
            return
        export_dir = Path(self.hparams.export_dir)
        debug = bool(self.trainer.fast_dev_run)
        if debug and any((export_dir / name).exists() for name in EXPORT_FILES):
            # one step of training: its weights must not replace a pre-trained backbone later steps read
            log.info("fast_dev_run: %s left as it is (a debug run's weights replace no export)", export_dir)
            return
        # The pixel normalisation trained with goes with the weights (the data module resolved it).
        norm = getattr(self.trainer.datamodule, "normalization", None)
        export_weights(self, export_dir, pixel_norm=norm)
        if debug:
            log.info("fast_dev_run: exported the debug weights to %s (nothing was there; a real run "
                     "replaces them)", export_dir)


def export_weights(module: DetectionModule, export_dir: str | Path, pixel_norm: Any = None) -> Path:
    """backbone.safetensors (our backbone keys), detector.safetensors and config.json, written atomically;
    the safetensors record `pixel_norm` (a gridvqa.data.images.Normalization) when it is given."""
    from gridvqa.models.weights import pixel_norm_metadata, save_safetensors

    d = Path(export_dir)
    d.mkdir(parents=True, exist_ok=True)
    det_sd = {k: v for k, v in module.detector.state_dict().items() if not k.endswith("num_batches_tracked")}
    bb_sd = {k[len("backbone.") :]: v for k, v in det_sd.items() if k.startswith("backbone.")}
    hp = dict(module.hparams)
    meta = {"kind": hp["kind"], "backbone": dict(hp["backbone"]), "num_classes": hp["num_classes"]}
    metadata = {"config": json.dumps(meta), **pixel_norm_metadata(pixel_norm)}
    save_safetensors(bb_sd, d / "backbone.safetensors", metadata)
    save_safetensors(det_sd, d / "detector.safetensors", metadata)
    from gridvqa.data.jsonio import atomic_write_json

    atomic_write_json(
        d / "config.json", {k: (dict(v) if isinstance(v, dict) else v) for k, v in hp.items()}, indent=2
    )
    log.info("exported backbone and detector weights to %s", d)
    return d
