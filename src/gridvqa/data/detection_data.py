"""Visual Genome detection data: dataset, collate and the Lightning data module for pre-training."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from gridvqa.config import to_plain
from gridvqa.data import layout
from gridvqa.data.images import (
    ImagePipeline,
    ImageSpec,
    Normalization,
    SkipCounter,
    collate_images,
    load_image,
    resolve_image_spec,
)
from gridvqa.data.sampling import ResumableDataLoader, ShardSampler, global_seed
from gridvqa.data.vg import VisualGenome, read_split_file
from gridvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class VGDetectionDataset(Dataset):
    """One VG image with its boxes (x1, y1, x2, y2 in resized pixels), labels and attributes.

    A missing or broken image yields None (logged and counted); `collate_detection` drops it, so one
    bad file never ends an epoch. Keys are indices, or (epoch, index) from an `EpochShardSampler`, so
    that the random flip of an image changes from epoch to epoch, in loader workers too.
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

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        rec = self.vg[self.indices[i]]
        path = self.vg.image_path(rec.image_id)
        try:
            img = load_image(path)
            # Stored boxes are in the annotated image size; rescale if the file on disk differs.
            boxes = torch.as_tensor(rec.boxes, dtype=torch.float32)
            if (img.width, img.height) != (rec.width, rec.height):
                boxes = boxes * torch.tensor([img.width / rec.width, img.height / rec.height] * 2)
            rng = np.random.default_rng((self.seed, epoch, i))
            tensor, boxes, info = self.pipeline(img, boxes, rng=rng)
        except Exception as e:  # noqa: BLE001 - one image that cannot be prepared never ends a run
            reason = str(e) if isinstance(e, DataError) else f"{path}: {type(e).__name__}: {e}"
            self.skipped.add(path, reason)
            log.warning("skipping image: %s", reason)
            return None
        return {
            "image": tensor,
            "boxes": boxes,
            "labels": torch.as_tensor(rec.labels, dtype=torch.int64),
            "attributes": torch.as_tensor(rec.attributes, dtype=torch.int64),
            "image_id": rec.image_id,
            "info": info,
        }


class EpochShardSampler(ShardSampler):
    """A `ShardSampler` whose keys carry the epoch: (epoch, index)."""

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


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


class VGDataModule(pl.LightningDataModule):
    """VG-format detection data for pre-training, with its validation (AP) images.

    Which images train and which are scored:
    - `split_files` {train: [files], val: [files]}: image-id lists such as bottom-up-attention's
      data/genome/{train,val,test}.txt. grid-feats-vqa (configs/Base-RCNN-grid.yaml DATASETS) trains on
      train + val and reports AP on test: `{train: [train.txt, val.txt], val: [test.txt]}`.
    - without them, a deterministic held-out share (`val_fraction`, at most `max_val_images`) is scored.
    `exclude_vqa_val` also keeps out the images whose COCO twin is a VQA val image (when the VQA val
    questions are under the same data root), so that VQA val scores come from images the detector never
    saw. That is an option of ours; the reference pre-training does not do it.

    Loaders shard by rank themselves (`ShardSampler`, as the VQA data): the training order and the random
    flips depend on (seed, epoch) only and are restored mid-epoch on resume; under DDP every validation
    image is scored by exactly one rank. What was left out of the data (boxes and images, per reason) is
    logged once at setup.
    """

    def __init__(
        self,
        data_root: str,
        train_short: int | Sequence[int] = 600,
        test_short: int = 600,
        max_size: int = 1000,
        norm: str | None = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        weights: str | None = None,
        hflip_prob: float = 0.5,
        val_fraction: float = 0.1,
        max_val_images: int | None = 500,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        size_divisibility: int = 32,
        seed: int | None = 0,
        exclude_vqa_val: bool = True,
        split_files: dict[str, str | Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        train_short, split_files = to_plain(train_short), to_plain(split_files)
        pixel_mean, pixel_std = to_plain(pixel_mean), to_plain(pixel_std)
        _split_file_lists(split_files)  # a malformed setting fails here, before any data is read
        self.save_hyperparameters()
        # Training images as the backbone `weights` (ImageNet or converted) record their pixel normalisation.
        keys = {"short": "data.train_short", "max_size": "data.max_size", "norm": "data.norm",
                "mean": "data.pixel_mean", "std": "data.pixel_std", "hflip": "data.hflip_prob"}
        spec = ImageSpec(short=train_short, max_size=max_size, norm=norm, mean=pixel_mean, std=pixel_std,
                         hflip=hflip_prob, keys=keys)
        self.image_spec = resolve_image_spec(spec, weights)
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
        train_idx, val_idx = self._split_indices()
        train_pipe = ImagePipeline.from_spec(self.image_spec)
        test_pipe = ImagePipeline.from_spec(replace(self.image_spec, short=hp.test_short, hflip=0.0))
        self.train_set = VGDetectionDataset(self.vg, train_idx, train_pipe, seed=self.seed)
        self.val_set = VGDetectionDataset(self.vg, val_idx, test_pipe, seed=self.seed)
        if self.trainer is None or self.trainer.is_global_zero:  # every DDP process reads the same files
            for line in self.vg.stats.summary_lines():
                log.info(line)
            log.info("Visual Genome: %d training and %d validation images", len(train_idx), len(val_idx))

    def _split_indices(self) -> tuple[list[int], list[int]]:
        """(training, validation) record indices, from the split files or a seeded hold-out."""
        hp = self.hparams
        assert self.vg is not None
        if hp.exclude_vqa_val and layout.questions_path(hp.data_root, "val").is_file():
            from gridvqa.data.vqa2 import read_questions

            self.vg.exclude_coco_ids(
                {int(q["image_id"]) for q in read_questions(layout.questions_path(hp.data_root, "val"))}
            )
        files = _split_file_lists(hp.split_files)
        if files is None:
            order = np.random.default_rng(self.seed).permutation(len(self.vg))
            n_val = max(1, int(round(len(order) * hp.val_fraction)))
            if hp.max_val_images:
                n_val = min(n_val, hp.max_val_images)
            return order[n_val:].tolist(), sorted(order[:n_val].tolist())
        ids = {part: set().union(*(read_split_file(f) for f in paths)) for part, paths in files.items()}
        both = ids["train"] & ids["val"]
        if both:
            raise DataError(f"{', '.join(files['val'])}: {len(both)} validation image(s) are also in the "
                            f"training split files (e.g. image {min(both)})")
        self.vg.keep_image_ids(ids["train"] | ids["val"])
        train = [i for i, r in enumerate(self.vg.records) if r.image_id in ids["train"]]
        val = [i for i, r in enumerate(self.vg.records) if r.image_id in ids["val"]]
        for part, idx in (("train", train), ("val", val)):
            if not idx:
                raise DataError(f"{', '.join(files[part])}: no annotated Visual Genome image of these "
                                f"split files is in {layout.vg_dir(hp.data_root)}")
        if hp.max_val_images and len(val) > hp.max_val_images:
            pick = np.random.default_rng(self.seed).permutation(len(val))[: hp.max_val_images]
            val = sorted(val[k] for k in pick)
        return train, val

    @property
    def seed(self) -> int:
        """The data seed: `seed`, else the one `seed_everything` set (so every DDP process agrees)."""
        return int(self.hparams.seed) if self.hparams.seed is not None else global_seed()

    @property
    def normalization(self) -> Normalization:
        """The pixel normalisation the images get (pre-training records it with the weights it exports)."""
        return self.image_spec.normalization()

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.vg.num_classes

    @property
    def num_attributes(self) -> int:
        self.setup()
        return self.vg.num_attributes

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int) -> ResumableDataLoader:
        """Training (`shuffle=True`): shuffled, shards padded to equal sizes; else in order, unpadded."""
        from functools import partial

        hp = self.hparams
        kw = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        replicas, rank = int(kw.get("num_replicas", 1)), int(kw.get("rank", 0))
        if not shuffle and len(ds) < replicas:  # type: ignore[arg-type]
            n = len(ds)  # type: ignore[arg-type]
            raise DataError(f"{layout.vg_dir(hp.data_root)}: {n} validation images for {replicas} processes; "
                            "every process needs at least one")
        sampler_cls = EpochShardSampler if shuffle else ShardSampler
        sampler = sampler_cls(ds, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=self.seed,
                              pad=shuffle)
        return ResumableDataLoader(
            ds,
            sampler=sampler,
            batch_size=batch_size,
            num_workers=hp.num_workers,
            collate_fn=partial(collate_detection, size_divisibility=hp.size_divisibility),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.train_set, True, self.hparams.batch_size)

    def val_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.val_set, False, self.hparams.val_batch_size or self.hparams.batch_size)


def _split_file_lists(split_files: dict | None) -> dict[str, list[str]] | None:
    """`{train: path | [paths], val: path | [paths]}` -> lists of paths; anything else is a ConfigError."""
    if split_files is None:
        return None
    if not isinstance(split_files, dict) or set(split_files) != {"train", "val"}:
        raise ConfigError(f"data.split_files must be null or {{train: [files], val: [files]}}, "
                          f"got {split_files!r}")
    out: dict[str, list[str]] = {}
    for part, v in split_files.items():
        paths = [v] if isinstance(v, str) else list(v) if isinstance(v, Sequence) else None
        if not paths or not all(isinstance(x, str) and x for x in paths):
            raise ConfigError(f"data.split_files.{part} must be a file or a list of files, got {v!r}")
        out[part] = paths
    return out
