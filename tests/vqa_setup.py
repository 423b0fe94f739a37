"""A bare Lightning fit of a VQA model and data module, for tests that check what training steps do to the
model (schedules, freezing): no logger, checkpoints, progress bar or validation, on one CPU thread."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


def bare_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer that writes nothing and skips validation; `kwargs` set the length and callbacks."""
    base = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0}
    return pl.Trainer(**{**base, **kwargs})


def fit_on_one_thread(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule
) -> None:
    """trainer.fit with torch on one thread: ops this small run faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        torch.set_num_threads(threads)
