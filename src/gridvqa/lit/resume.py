"""What an exact resume needs beyond the model, optimizer, scheduler and loop state Lightning saves.

`ExactResume` (conf/callbacks/default.yaml) does two things:

- Data order: Lightning saves the state of a loader that has `state_dict`/`load_state_dict` (our
  `ResumableDataLoader`) and hands it back when it sets up the train loader on resume. But a module
  that asks `trainer.estimated_stepping_batches` in `configure_optimizers` (VQAModule does, for its
  schedule) makes Lightning set the loader up before the checkpoint's loop state is restored, and
  the saved loader state is then never applied (Lightning 2.6). It is applied here at train start,
  after the restore and before the first batch is drawn (our loaders start their iterator lazily).
- Random numbers: a checkpoint holds no RNG states, and a resumed run draws random numbers at other
  moments than the run it continues (loader start-up, a validation pass). Seeding torch, numpy and
  `random` before every training batch from (seed, epoch, batch index, global rank) makes dropout and
  every other random op of a step the same whether or not the run was interrupted before it, on any
  number of processes, without per-rank RNG states in checkpoints.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytorch_lightning as pl
import torch

from gridvqa.data.sampling import global_seed

log = logging.getLogger(__name__)


def step_seeds(seed: int, epoch: int, batch_idx: int, rank: int) -> np.ndarray:
    """Four well-mixed 32-bit words from the four numbers (numpy's SeedSequence hashing)."""
    return np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(4)


class ExactResume(pl.Callback):
    """Restores the train loader's saved position and seeds the RNGs at every training batch.

    `seed`: default, the one `seed_everything` set.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop
        pending = getattr(loop, "_combined_loader_states_to_load", None)
        if pending:
            if not hasattr(loop, "_load_combined_loader_states"):
                log.warning("this Lightning version cannot restore the train loader's position: the resumed "
                            "epoch will not see the data the interrupted run would have")
                return
            loop._load_combined_loader_states()  # Lightning's own routine, applied once restored

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        seed = self.seed if self.seed is not None else global_seed()
        words = step_seeds(seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        torch.manual_seed((int(words[0]) << 32) | int(words[1]))  # also seeds every CUDA device
        np.random.seed(words)
        random.seed((int(words[2]) << 32) | int(words[3]))
