"""Callbacks shared by the training configs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytorch_lightning as pl

from gridvqa.errors import DataError

log = logging.getLogger(__name__)


class PublishCheckpoint(pl.Callback):
    """Copy the best (else last) checkpoint to a fixed place when training ends, atomically.

    Run folders are time-stamped; later steps (finetune's `init_from`, evaluate, predict, the notebook)
    need one stable path per task, e.g. `artifacts/e2e/model.ckpt`. Whether that place can be written is
    checked when fitting starts, not after the training. A `fast_dev_run` (`debug=fdr`) model, one
    step of training, never replaces a file already there: it is published only where none is.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            from gridvqa.config_checks import check_writable

            check_writable(self.path, "callbacks.publish_checkpoint.path")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        if trainer.fast_dev_run and self.path.exists():
            log.info("fast_dev_run: %s left as it is (a debug run's weights replace no model)", self.path)
            return
        cb = trainer.checkpoint_callback
        src = None
        if cb is not None:
            src = cb.best_model_path or cb.last_model_path
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if src and Path(src).is_file():
                shutil.copyfile(src, tmp)
            else:
                trainer.save_checkpoint(tmp, weights_only=False)
            tmp.replace(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            kept = f"the trained checkpoint is {src}" if src and Path(src).is_file() else "no checkpoint kept"
            why = e.strerror or e
            raise DataError(f"{self.path}: cannot publish the trained model ({why}); {kept}") from e
        if trainer.fast_dev_run:
            log.info("fast_dev_run: published the debug model to %s (nothing was there; a real run replaces "
                     "it)", self.path)
        else:
            log.info("published checkpoint %s -> %s", src or "(current weights)", self.path)
