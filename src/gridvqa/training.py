"""The body of `python -m gridvqa.train`: instantiate, fit, test, return the optimised metric.

No model-specific branches (lightning-hydra-template convention): the experiment config decides
the data module, the LightningModule, callbacks, loggers and trainer through `_target_`s.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from gridvqa.reporting import write_run_summary

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a callbacks/logger group that has a `_target_`."""
    out = []
    if not cfg:
        return out
    for _, sub in cfg.items():
        if isinstance(sub, DictConfig) and "_target_" in sub:
            out.append(hydra.utils.instantiate(sub))
    return out


def _resolve_ckpt(ckpt_path: str | None, output_dir: str) -> str | None:
    """`last` -> the newest last.ckpt of this run's folder (None when it has none yet)."""
    if ckpt_path != "last":
        return ckpt_path
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def _finish_wandb() -> None:
    """wandb keeps one run open per process: finished here, the next job of a sweep run in the same
    process (Hydra's basic launcher) gets a run of its own instead of logging into this one."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run(cfg: DictConfig) -> float | None:
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.get("train", True):
        trainer.fit(
            model, datamodule=datamodule, ckpt_path=_resolve_ckpt(cfg.get("ckpt_path"), cfg.paths.output_dir)
        )
    elif cfg.get("validate", False):  # score the model as built (e.g. untrained, or from ckpt_path)
        trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test", False):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    name = cfg.get("optimized_metric")
    value = metrics.get(name) if name else None
    log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    if name and value is None:
        log.warning("optimized_metric %r was not logged; known: %s", name, sorted(metrics))
    if trainer.is_global_zero:  # the run's summary for `python -m gridvqa.report`
        write_run_summary(cfg, metrics, value, minutes=(time.perf_counter() - start) / 60)
    _finish_wandb()
    return value
