"""Lightning's "`weights_only` was not set" line is dropped once AtomicCheckpointIO is in use, and nothing
else that logger says is.

Checked on Lightning's own logger with a handler of this test's own, with the logger enabled and at INFO
for the test's duration: other tests (Hydra's logging set-up, Lightning's) may disable loggers, drop
handlers or stop propagation, so neither caplog nor the root logger is relied on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch

from gridvqa.lit.checkpoint_io import AtomicCheckpointIO, quiet_weights_only_notice

CONNECTOR_LOGGER = "pytorch_lightning.trainer.connectors.checkpoint_connector"
NOTICE = "`weights_only` was not set"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def connector_lines(without_filters: bool = False) -> Iterator[list[str]]:
    """What Lightning's checkpoint connector logs inside the block (its filters removed meanwhile when
    `without_filters`: what Lightning says on its own)."""
    logger = logging.getLogger(CONNECTOR_LOGGER)
    handler = Lines()
    saved = (logger.level, logger.disabled, list(logger.filters))
    disabled_below = logging.root.manager.disable  # logging.disable(LEVEL), process-wide
    logging.disable(logging.NOTSET)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    if without_filters:
        for f in saved[2]:
            logger.removeFilter(f)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logging.disable(disabled_below)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]
        for f in saved[2]:
            if f not in logger.filters:
                logger.addFilter(f)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fitted_trainer(tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_steps=1,
                         default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])
    trainer.fit(Tiny())
    return trainer


def test_weights_only_notice_is_dropped_and_nothing_else(tmp_path):
    trainer = fitted_trainer(tmp_path)
    with connector_lines(without_filters=True) as lines:  # what Lightning says unfiltered: the notice
        trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert any(NOTICE in line for line in lines), lines

    quiet_weights_only_notice()
    quiet_weights_only_notice()  # idempotent: one filter
    logger = logging.getLogger(CONNECTOR_LOGGER)
    assert sum(type(f).__name__ == "_DropWeightsOnlyNotice" for f in logger.filters) == 1
    with connector_lines() as lines:
        trainer.save_checkpoint(tmp_path / "b.ckpt")
        logger.info("another connector line")
    assert lines == ["another connector line"]
    assert (tmp_path / "b.ckpt").is_file()
