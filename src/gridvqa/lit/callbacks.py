"""Callbacks shared by the training configs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class PublishCheckpoint(pl.Callback):
    """Copy the best (else last) checkpoint to a fixed place when training ends, atomically.

    Run folders are time-stamped; later steps (finetune's `init_from`, evaluate, predict, the notebook)
    need one stable path per task, e.g. `artifacts/e2e/model.ckpt`.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        cb = trainer.checkpoint_callback
        src = None
        if cb is not None:
            src = cb.best_model_path or cb.last_model_path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        if src and Path(src).is_file():
            shutil.copyfile(src, tmp)
        else:
            trainer.save_checkpoint(tmp)
        tmp.replace(self.path)
        log.info("published checkpoint %s -> %s", src or "(current weights)", self.path)
