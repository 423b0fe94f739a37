"""Validation attention pictures: where a VQA model looks on a few fixed validation questions, each epoch.

The same questions every epoch (the first `num` of the validation split, or `question_ids`), so pictures
from successive epochs show how the attention settles. Drawing is `gridvqa.viz` (heat map over the grid
for pixels / grid_h5 models, boxes shaded by weight for region_h5 models). Pictures go to every logger
that takes images (wandb: `log_image`, TensorBoard: `add_image`) and, for the others (csv), to PNG files
`<dirpath>/epoch_XXX/question_<id>.png` in the run folder. Rank zero only, no gradients, a forward pass
of one image per question: cheap beside a validation epoch.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from gridvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_KEY = "val/attention"  # wandb key; TensorBoard tags are IMAGE_KEY + "/question_<id>"


class ValAttentionImages(pl.Callback):
    """Draw the model's attention on fixed validation questions at the end of each validation epoch.

    Args:
        dirpath: where PNGs go (`epoch_XXX/question_<id>.png`); default `<default_root_dir>/attention`.
        num: how many questions (the first `num` of the validation split, chosen once).
        question_ids: these questions instead (ids of the validation split).
        which, layer: the attention drawn: `flat` (AttFlat) or `guided` (a decoder layer, -1 = last).
        every_n_epochs: draw after every n-th epoch's validation.
        save_png: write PNG files: True, False, or None = when some logger takes no images (csv) or there
            is no logger.
        dpi, topk: picture resolution and how many answers are listed.

    Harmless beside other modules: a model that is not a `VQAModule` (detector pre-training shares the
    callbacks group) or data that is not a `VQADataModule` turns it off with one info line.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        num: int = 4,
        question_ids: Sequence[int] | None = None,
        which: str = "flat",
        layer: int = -1,
        every_n_epochs: int = 1,
        save_png: bool | None = None,
        dpi: int = 80,
        topk: int = 5,
    ) -> None:
        from gridvqa.viz.attention import WHICH

        if int(num) < 1:
            raise ConfigError(f"ValAttentionImages: num={num}: must be at least 1")
        if which not in WHICH:
            raise ConfigError(f"ValAttentionImages: which={which!r}: expected one of {WHICH}")
        if int(every_n_epochs) < 1:
            raise ConfigError(f"ValAttentionImages: every_n_epochs={every_n_epochs}: must be at least 1")
        self.dirpath = dirpath
        self.num = int(num)
        self.question_ids = [int(q) for q in question_ids] if question_ids else None
        self.which, self.layer = which, int(layer)
        self.every_n_epochs = int(every_n_epochs)
        self.save_png = save_png
        self.dpi, self.topk = int(dpi), int(topk)
        self._enabled = False
        self._entries: list = []
        self._dataset = None
        self._label_names: list[str] | None = None

    # -- choosing the questions (once) ---------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from gridvqa.lit.vqa_module import VQAModule

        self._enabled = False
        if stage not in ("fit", "validate"):
            return
        dm = trainer.datamodule
        if not isinstance(pl_module, VQAModule) or dm is None or not hasattr(dm, "dataset"):
            log.info("validation attention pictures are for VQA models on a VQADataModule: off for %s",
                     type(pl_module).__name__)
            return
        from gridvqa.viz.attention import object_names, pick_questions

        # The datamodule's own validation set: its entries (limit_val applied) and its opened feature file.
        self._dataset = dm.dataset(dm.hparams.val_split)
        num = 1 if trainer.fast_dev_run else self.num  # fast_dev_run only checks that drawing runs
        self._entries = pick_questions(self._dataset.entries, num, self.question_ids, seed=None)
        region = pl_module.hparams.source == "region_h5"
        self._label_names = object_names(self._dataset.root) if region else None
        self._enabled = True

    # -- drawing -------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        pictures = self._draw(trainer, pl_module)
        if pictures:
            self._log(trainer, pictures)

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[tuple[int, bytes, str]]:
        """(question id, PNG bytes, caption) per question that could be drawn."""
        from gridvqa.viz.attention import explain_entry, plot_explanations, png_bytes

        ds = self._dataset
        name = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        out = []
        # autocast as in the validation steps (bf16-mixed on GPUs); explain itself runs in inference mode
        with trainer.precision_plugin.forward_context():
            for e in self._entries:
                try:
                    ex = explain_entry(pl_module, e, ds.root, ds.split, ds.features, topk=self.topk,
                                       name=name, label_names=self._label_names)
                except (DataError, OSError) as err:  # a missing / unreadable image must not stop training
                    log.warning("attention picture of question %d skipped: %s", e.question_id, err)
                    continue
                fig = plot_explanations([ex], self.which, self.layer)
                answer = ex.top[0][0] if ex.top else "?"
                out.append((e.question_id, png_bytes(fig, self.dpi), f"{e.question} -> {answer}"))
        return out

    def _log(self, trainer: pl.Trainer, pictures: list[tuple[int, bytes, str]]) -> None:
        step = trainer.global_step
        arrays: list[np.ndarray] | None = None
        takes_no_images = not trainer.loggers
        for lg in trainer.loggers:
            if isinstance(lg, (WandbLogger, TensorBoardLogger)) and arrays is None:
                arrays = [_rgb(png) for _, png, _ in pictures]
            if isinstance(lg, WandbLogger):
                lg.log_image(key=IMAGE_KEY, images=arrays, step=step,
                             caption=[f"question {q}: {c}" for q, _, c in pictures])
            elif isinstance(lg, TensorBoardLogger):
                for (qid, _, _), arr in zip(pictures, arrays, strict=True):
                    lg.experiment.add_image(f"{IMAGE_KEY}/question_{qid}", arr, step, dataformats="HWC")
            else:
                takes_no_images = True
        if self.save_png or (self.save_png is None and takes_no_images):
            self._write_pngs(trainer, pictures)

    def _write_pngs(self, trainer: pl.Trainer, pictures: list[tuple[int, bytes, str]]) -> None:
        from gridvqa.atomic import atomic_write_bytes

        root = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "attention"
        folder = root / f"epoch_{trainer.current_epoch:03d}"
        for qid, png, _ in pictures:
            atomic_write_bytes(folder / f"question_{qid}.png", png)
        log.info("attention pictures of %d validation questions: %s", len(pictures), folder)


def _rgb(png: bytes) -> np.ndarray:
    """uint8 [H, W, 3]: what TensorBoard's add_image and wandb.Image take."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))
