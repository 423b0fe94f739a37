"""VQA datasets and the Lightning data module: questions + answers + a visual source.

Visual sources (the same module serves every experiment):
- `pixels`: the image itself, through the image pipeline (the backbone runs in the model).
- `grid_h5` / `region_h5`: pre-extracted features read from HDF5 (see gridvqa.data.features).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

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
from gridvqa.data.sampling import ResumableDataLoader, ShardSampler, global_seed
from gridvqa.data.vqa2 import AnswerVocab, VQAEntry, load_split
from gridvqa.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("pixels", "grid_h5", "region_h5")


class VQADataset(Dataset):
    """Items: the visual input of one image with its questions (tokenised, soft-score targets).

    `group_by_image=True` makes one item per image holding all its questions, so batches carry each
    image once (`batch_size` then counts images); otherwise one item per question.
    """

    def __init__(
        self,
        entries: Sequence[VQAEntry],
        q_ids: torch.Tensor,
        q_mask: torch.Tensor,
        vocab: AnswerVocab,
        split: str,
        data_root: str | Path,
        source: str = "pixels",
        pipeline: ImagePipeline | None = None,
        features=None,
        group_by_image: bool = False,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown visual source {source!r}; expected one of {SOURCES}")
        self.entries = list(entries)
        self.q_ids, self.q_mask = q_ids, q_mask
        self.vocab = vocab
        self.split = split
        self.root = Path(data_root)
        self.source = source
        self.pipeline = pipeline
        self.features = features
        self.skipped = SkipCounter()
        self.groups: list[list[int]] | None = None
        if group_by_image:
            by_image: dict[int, list[int]] = {}
            for i, e in enumerate(self.entries):
                by_image.setdefault(e.image_id, []).append(i)
            self.groups = list(by_image.values())

    def __len__(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.entries)

    def target(self, e: VQAEntry) -> torch.Tensor:
        t = torch.zeros(len(self.vocab))
        for idx, score in self.vocab.targets(e.answers).items():
            t[idx] = score
        return t

    def visual(self, e: VQAEntry) -> dict | None:
        if self.source == "pixels":
            path = layout.coco_image_path(self.root, self.split, e.image_id)
            try:
                img = load_image(path)
            except DataError as err:
                self.skipped.add(path, str(err))
                log.warning("skipping question %d: %s", e.question_id, err)
                return None
            tensor, _, info = self.pipeline(img)
            return {"image": tensor, "orig_size": info["orig_size"]}
        try:
            item = self.features.get(e.image_id)
        except KeyError:
            self.skipped.add(f"{self.features.path}:{e.image_id}", "image not in the feature file")
            log.warning(
                "skipping question %d: image %d not in %s", e.question_id, e.image_id, self.features.path
            )
            return None
        if self.source == "grid_h5":
            grid = torch.from_numpy(np.asarray(item["grid"], dtype=np.float32))  # [H, W, C]
            return {"grid": grid, "orig_size": tuple(item["image_size"])}
        return {
            "regions": torch.from_numpy(np.asarray(item["features"], dtype=np.float32)),
            "boxes": torch.from_numpy(np.asarray(item["boxes"], dtype=np.float32)),
            "orig_size": tuple(item["image_size"]),
        }

    def question_item(self, i: int) -> dict:
        e = self.entries[i]
        return {
            "q_ids": self.q_ids[i],
            "q_mask": self.q_mask[i],
            "target": self.target(e),
            "index": i,
            "question_id": e.question_id,
            "image_id": e.image_id,
            "answers": e.answers,
            "answer_type": e.answer_type or "other",
        }

    def __getitem__(self, i: int) -> dict | None:
        """One image's visual input and the questions asked about it (one, or all when grouped)."""
        qs = self.groups[i] if self.groups is not None else [i]
        v = self.visual(self.entries[qs[0]])
        if v is None:
            return None
        v["questions"] = [self.question_item(q) for q in qs]
        return v


def collate_vqa(batch: list[dict | None], size_divisibility: int = 32) -> dict | None:
    """Visual inputs once per image (padded, with masks) and questions flattened, `img_index` linking
    each question to its image: the backbone then runs once per image, not once per question."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    qs = [q for b in items for q in b["questions"]]
    out = {
        "q_ids": torch.stack([q["q_ids"] for q in qs]),
        "q_mask": torch.stack([q["q_mask"] for q in qs]),
        "target": torch.stack([q["target"] for q in qs]),
        "index": torch.tensor([q["index"] for q in qs]),
        "question_id": torch.tensor([q["question_id"] for q in qs]),
        "image_id": torch.tensor([q["image_id"] for q in qs]),
        "answers": [q["answers"] for q in qs],
        "answer_type": [q["answer_type"] for q in qs],
        "img_index": torch.tensor([k for k, b in enumerate(items) for _ in b["questions"]]),
        "orig_size": torch.tensor([b["orig_size"] for b in items]),
    }
    if "image" in items[0]:
        out["images"], out["pixel_mask"], out["image_sizes"] = collate_images(
            [b["image"] for b in items], size_divisibility=size_divisibility
        )
    elif "grid" in items[0]:
        hs = [b["grid"].shape[0] for b in items]
        ws = [b["grid"].shape[1] for b in items]
        c = items[0]["grid"].shape[2]
        grid = torch.zeros(len(items), max(hs), max(ws), c)
        mask = torch.zeros(len(items), max(hs), max(ws), dtype=torch.bool)
        for k, b in enumerate(items):
            grid[k, : hs[k], : ws[k]] = b["grid"]
            mask[k, : hs[k], : ws[k]] = True
        out["grid"], out["grid_mask"] = grid, mask
    else:
        n = max(b["regions"].shape[0] for b in items)
        c = items[0]["regions"].shape[1]
        regions = torch.zeros(len(items), n, c)
        boxes = torch.zeros(len(items), n, 4)
        mask = torch.zeros(len(items), n, dtype=torch.bool)
        for k, b in enumerate(items):
            m = b["regions"].shape[0]
            regions[k, :m], boxes[k, :m], mask[k, :m] = b["regions"], b["boxes"], True
        out["regions"], out["boxes"], out["region_mask"] = regions, boxes, mask
    return out


def build_pipeline(
    size: Sequence[int] | None, short: int | None, max_size: int | None, norm: str, hflip_prob: float = 0.0
) -> ImagePipeline:
    resize = ResizeFixed(int(size[0]), int(size[1])) if size is not None else ResizeShortest(short, max_size)
    return ImagePipeline(resize, norm=norm, hflip_prob=hflip_prob)


class VQADataModule(pl.LightningDataModule):
    """VQA v2-format questions/answers (built-in set or real VQA v2) with one visual source.

    Loaders shard by rank themselves (`ShardSampler`): the training order depends on (seed, epoch)
    only and is restored mid-epoch on resume; under DDP every validation/test question is scored by
    exactly one rank. `seed` defaults to the one `seed_everything` set.
    """

    def __init__(
        self,
        data_root: str,
        source: str = "pixels",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        image_size: Sequence[int] | None = (448, 448),
        short: int | None = None,
        max_size: int | None = None,
        norm: str = "detectron2",
        features: dict[str, str] | None = None,
        max_length: int = 14,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        size_divisibility: int = 32,
        limit_train: int | None = None,
        limit_val: int | None = None,
        group_by_image: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        image_size, features = to_plain(image_size), to_plain(features)
        self.save_hyperparameters()
        self.vocab: AnswerVocab | None = None
        self.tokenizer = None
        self.datasets: dict[str, VQADataset] = {}

    def _load_vocab(self) -> None:
        if self.vocab is None:
            root = self.hparams.data_root
            from gridvqa.data.text import load_tokenizer

            self.vocab = AnswerVocab.load(layout.answers_path(root))
            self.tokenizer = load_tokenizer(layout.tokenizer_dir(root), self.hparams.max_length)

    def dataset(self, split: str) -> VQADataset:
        """The dataset of one split (cached); questions tokenised once up front."""
        if split in self.datasets:
            return self.datasets[split]
        self._load_vocab()
        from gridvqa.data.text import encode

        hp = self.hparams
        entries = load_split(hp.data_root, split)
        limit = hp.limit_train if split == hp.train_split else hp.limit_val
        if limit:
            entries = entries[:limit]
        if not entries:
            raise DataError(f"{layout.questions_path(hp.data_root, split)}: no questions")
        q_ids, q_mask = encode(self.tokenizer, [e.question for e in entries], max_length=hp.max_length)
        features = None
        pipeline = None
        if hp.source == "pixels":
            pipeline = build_pipeline(hp.image_size, hp.short, hp.max_size, hp.norm)
        else:
            from gridvqa.data.features import open_features

            path = (hp.features or {}).get(split)
            if path is None:
                raise DataError(
                    f"no feature file configured for split {split!r} (data.features.{split}=PATH)"
                )
            features = open_features(path)
        ds = VQADataset(
            entries,
            q_ids,
            q_mask,
            self.vocab,
            split,
            hp.data_root,
            hp.source,
            pipeline,
            features,
            hp.group_by_image,
        )
        self.datasets[split] = ds
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset(self.hparams.train_split)
            self.dataset(self.hparams.val_split)
        elif stage == "validate":
            self.dataset(self.hparams.val_split)
        elif stage in ("test", "predict"):
            self.dataset(self.hparams.test_split)

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> ResumableDataLoader:
        """Training (`shuffle=True`): shuffled, shards padded to equal sizes; else in order, unpadded."""
        hp = self.hparams
        ds = self.dataset(split)
        kw = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        replicas, rank = int(kw.get("num_replicas", 1)), int(kw.get("rank", 0))
        if not shuffle and len(ds) < replicas:
            raise DataError(
                f"{layout.questions_path(hp.data_root, split)}: {len(ds)} items for {replicas} processes; "
                "every process needs at least one"
            )
        seed = hp.seed if hp.seed is not None else global_seed()
        sampler = ShardSampler(ds, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, pad=shuffle)
        return ResumableDataLoader(
            ds,
            sampler=sampler,
            batch_size=batch_size or (hp.batch_size if shuffle else hp.val_batch_size or hp.batch_size),
            num_workers=hp.num_workers,
            collate_fn=partial(collate_vqa, size_divisibility=hp.size_divisibility),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.hparams.train_split, shuffle=True)

    def val_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.hparams.val_split)

    def test_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.hparams.test_split)
