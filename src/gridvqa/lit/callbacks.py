"""Callbacks shared by the training configs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytorch_lightning as pl

from gridvqa.atomic import atomic_path
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

    def _plan(self, trainer: pl.Trainer) -> tuple[str, str | None]:
        """("keep", None), ("copy", checkpoint file) or ("save", None): what rank 0 sees on its disk."""
        if trainer.fast_dev_run and self.path.exists():
            return "keep", None
        cb = trainer.checkpoint_callback
        src = (cb.best_model_path or cb.last_model_path) if cb is not None else None
        return ("copy", src) if src and Path(src).is_file() else ("save", None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # every process runs this; rank 0 decides, so that all of them take the same branch
        plan, src = trainer.strategy.broadcast(self._plan(trainer) if trainer.is_global_zero else None, src=0)
        if plan == "keep":
            if trainer.is_global_zero:
                log.info("fast_dev_run: %s left as it is (a debug run's weights replace no model)", self.path)
            return
        if not trainer.is_global_zero:
            if plan == "save":  # Trainer.save_checkpoint is collective: rank 0 writes, every rank waits
                trainer.save_checkpoint(self.path, weights_only=False)
            return
        try:
            with atomic_path(self.path) as tmp:
                if plan == "copy":
                    shutil.copyfile(src, tmp)
                else:
                    trainer.save_checkpoint(tmp, weights_only=False)
        except OSError as e:
            kept = f"the trained checkpoint is {src}" if src else "no checkpoint kept"
            why = e.strerror or e
            raise DataError(f"{self.path}: cannot publish the trained model ({why}); {kept}") from e
        if trainer.fast_dev_run:
            log.info("fast_dev_run: published the debug model to %s (nothing was there; a real run replaces "
                     "it)", self.path)
        else:
            log.info("published checkpoint %s -> %s", src or "(current weights)", self.path)
