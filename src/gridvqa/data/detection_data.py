"""Visual Genome detection data: dataset, collate and the Lightning data module for pre-training."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from gridvqa.config import to_plain
from gridvqa.data import layout
from gridvqa.data.images import (
    ImagePipeline,
    ResizeFixed,
    ResizeShortest,
    SkipCounter,
    collate_images,
    load_image,
)
from gridvqa.data.vg import VisualGenome
from gridvqa.errors import DataError

log = logging.getLogger(__name__)


class VGDetectionDataset(Dataset):
    """One VG image with its boxes (x1, y1, x2, y2 in resized pixels), labels and attributes.

    A missing or broken image yields None (logged and counted); `collate_detection` drops it, so one
    bad file never ends an epoch.
    """

    def __init__(
        self, vg: VisualGenome, indices: Sequence[int], pipeline: ImagePipeline, seed: int = 0
    ) -> None:
        self.vg = vg
        self.indices = list(indices)
        self.pipeline = pipeline
        self.skipped = SkipCounter()
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict | None:
        rec = self.vg[self.indices[i]]
        path = self.vg.image_path(rec.image_id)
        try:
            img = load_image(path)
        except DataError as e:
            self.skipped.add(path, str(e))
            log.warning("skipping image: %s", e)
            return None
        # Stored boxes are in the annotated image size; rescale if the file on disk differs.
        boxes = torch.as_tensor(rec.boxes, dtype=torch.float32)
        if (img.width, img.height) != (rec.width, rec.height):
            boxes = boxes * torch.tensor([img.width / rec.width, img.height / rec.height] * 2)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        tensor, boxes, info = self.pipeline(img, boxes, rng=rng)
        return {
            "image": tensor,
            "boxes": boxes,
            "labels": torch.as_tensor(rec.labels, dtype=torch.int64),
            "attributes": torch.as_tensor(rec.attributes, dtype=torch.int64),
            "image_id": rec.image_id,
            "info": info,
        }


def collate_detection(batch: list[dict | None], size_divisibility: int = 32) -> dict | None:
    items = [b for b in batch if b is not None]
    if not items:
        return None
    images, mask, sizes = collate_images([b["image"] for b in items], size_divisibility=size_divisibility)
    return {
        "images": images,
        "image_sizes": [tuple(int(v) for v in s) for s in sizes],
        "targets": [
            {"boxes": b["boxes"], "labels": b["labels"], "attributes": b["attributes"]} for b in items
        ],
        "image_ids": [b["image_id"] for b in items],
        "infos": [b["info"] for b in items],
    }


def build_resize(
    short: int | Sequence[int] | None = None, max_size: int | None = None, size: Sequence[int] | None = None
):
    """`size=(h, w)` -> fixed resize; else shortest-side resize (short may be a tuple to choose from)."""
    if size is not None:
        return ResizeFixed(int(size[0]), int(size[1]))
    short_v = tuple(short) if isinstance(short, Sequence) else short
    return ResizeShortest(short=short_v, max_size=max_size)


class VGDataModule(pl.LightningDataModule):
    """VG-format detection data; a deterministic held-out share of the images is the validation set.

    VQA val images are kept out of pre-training (as the recipe does) when their COCO ids are known
    from the VQA val questions under the same data root.
    """

    def __init__(
        self,
        data_root: str,
        train_short: int | Sequence[int] = 600,
        test_short: int = 600,
        max_size: int = 1000,
        norm: str = "detectron2",
        hflip_prob: float = 0.5,
        val_fraction: float = 0.1,
        max_val_images: int | None = 500,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        size_divisibility: int = 32,
        seed: int = 0,
        exclude_vqa_val: bool = True,
    ) -> None:
        super().__init__()
        train_short = to_plain(train_short)
        self.save_hyperparameters()
        self.vg: VisualGenome | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.vg is not None:
            return
        hp = self.hparams
        vg_dir = layout.vg_dir(hp.data_root)
        if not (Path(vg_dir) / "image_data.json").is_file():
            raise DataError(
                f"{vg_dir}/image_data.json: Visual Genome data not found "
                f"(make the built-in set with: python -m gridvqa.data.synthetic {hp.data_root})"
            )
        self.vg = VisualGenome(vg_dir)
        if hp.exclude_vqa_val and layout.questions_path(hp.data_root, "val").is_file():
            from gridvqa.data.vqa2 import read_questions

            self.vg.exclude_coco_ids(
                {int(q["image_id"]) for q in read_questions(layout.questions_path(hp.data_root, "val"))}
            )
        order = np.random.default_rng(hp.seed).permutation(len(self.vg))
        n_val = max(1, int(round(len(order) * hp.val_fraction)))
        if hp.max_val_images:
            n_val = min(n_val, hp.max_val_images)
        train_pipe = ImagePipeline(
            build_resize(hp.train_short, hp.max_size), norm=hp.norm, hflip_prob=hp.hflip_prob
        )
        test_pipe = ImagePipeline(build_resize(hp.test_short, hp.max_size), norm=hp.norm)
        self.train_set = VGDetectionDataset(self.vg, order[n_val:].tolist(), train_pipe, seed=hp.seed)
        self.val_set = VGDetectionDataset(self.vg, sorted(order[:n_val].tolist()), test_pipe, seed=hp.seed)

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.vg.num_classes

    @property
    def num_attributes(self) -> int:
        self.setup()
        return self.vg.num_attributes

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        from functools import partial

        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate_detection, size_divisibility=self.hparams.size_divisibility),
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.hparams.val_batch_size or self.hparams.batch_size)
