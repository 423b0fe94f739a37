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
    SkipCounter,
    collate_images,
    collate_unresized,
    decode_rgb,
    load_image,
    resolve_image_spec,
)
from gridvqa.data.sampling import ResumableDataLoader, ShardSampler, global_seed
from gridvqa.data.vqa2 import AnswerVocab, VQAEntry, load_splits, split_names
from gridvqa.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("pixels", "grid_h5", "region_h5")


class VQADataset(Dataset):
    """Items: the visual input of one image with its questions (tokenised, soft-score targets).

    `group_by_image=True` makes one item per image holding all its questions, so batches carry each
    image once (`batch_size` then counts images); otherwise one item per question.
    `keep_blind=True` (scoring splits): an image that cannot be read still yields its questions, marked
    `no_image`, so that they are scored (answered blind) rather than left out; training skips them.
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
        keep_blind: bool = False,
        resize_on_device: bool = False,
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
        self.keep_blind = keep_blind
        self.resize_on_device = resize_on_device
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
            path = layout.coco_image_path(self.root, e.split or self.split, e.image_id)
            try:
                if self.resize_on_device:  # decoded straight into a tensor: the device resizes
                    tensor, info = self.pipeline.unresized(decode_rgb(path))
                else:
                    tensor, _, info = self.pipeline(load_image(path))
            except Exception as err:  # noqa: BLE001 - one image that cannot be prepared never ends a run
                reason = str(err) if isinstance(err, DataError) else f"{path}: {type(err).__name__}: {err}"
                self.skipped.add(path, reason)
                log.warning("skipping question %d: %s", e.question_id, reason)
                return None
            if self.pipeline.normalize and not self.resize_on_device:
                return {"image": tensor, "orig_size": info["orig_size"]}
            # uint8: the model normalises on its device (VQAModule.pixels) with this
            out = {"image": tensor, "orig_size": info["orig_size"],
                   "pixel_norm": self.pipeline.normalization.to_dict()}
            if self.resize_on_device:  # ... after resizing there (collate_unresized)
                out["size"], out["flipped"] = info["size"], info["flipped"]
            return out
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
            if not self.keep_blind:
                return None
            return {"no_image": True, "questions": [self.question_item(q) for q in qs]}
        v["questions"] = [self.question_item(q) for q in qs]
        return v


def collate_vqa(batch: list[dict | None], size_divisibility: int = 32) -> dict | None:
    """Visual inputs once per image (padded, with masks) and questions flattened, `img_index` linking
    each question to its image: the backbone then runs once per image, not once per question.
    Questions whose image could not be read (`keep_blind` datasets) go to `blind` (their ids, human
    answers and answer types) and are the whole batch when no image of it could be read."""
    blind_qs = [q for b in batch if b is not None and b.get("no_image") for q in b["questions"]]
    items = [b for b in batch if b is not None and not b.get("no_image")]
    blind = {"question_id": torch.tensor([q["question_id"] for q in blind_qs]),
             "answers": [q["answers"] for q in blind_qs],
             "answer_type": [q["answer_type"] for q in blind_qs]} if blind_qs else None
    if not items:
        return {"blind": blind} if blind else None
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
    if "image" in items[0] and "size" in items[0]:
        out.update(collate_unresized([b["image"] for b in items], [b["size"] for b in items],
                                     [b["flipped"] for b in items], size_divisibility=size_divisibility))
        out["pixel_norm"] = items[0]["pixel_norm"]
    elif "image" in items[0]:
        out["images"], out["pixel_mask"], out["image_sizes"] = collate_images(
            [b["image"] for b in items], size_divisibility=size_divisibility
        )
        if "pixel_norm" in items[0]:
            out["pixel_norm"] = items[0]["pixel_norm"]
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
    if blind:
        out["blind"] = blind
    return out


# Where a split's image features may come from when it has no file of its own: test-dev images are
# test2015 images; VG-QA questions ask about COCO train2014 / val2014 images.
_FEATURE_FALLBACK: dict[str, tuple[str, ...]] = {"test-dev": ("test",), layout.VG_QA: ("train", "val")}


class ChainedFeatures:
    """Several feature files read as one (by image id, first file first): joined training splits."""

    def __init__(self, stores: Sequence) -> None:
        self.stores = list(stores)
        self.path = " + ".join(str(s.path) for s in self.stores)

    def __contains__(self, image_id: object) -> bool:
        return any(image_id in s for s in self.stores)

    def get(self, image_id: int) -> dict:
        for s in self.stores:
            if image_id in s:
                return s.get(image_id)
        raise KeyError(image_id)


def split_features(paths: dict[str, str], splits: Sequence[str]):
    """The feature reader for one or several splits from `data.features` ({split: PATH})."""
    from gridvqa.data.features import open_features

    chosen: list[str] = []
    for s in splits:
        keys = [s] if paths.get(s) else [k for k in _FEATURE_FALLBACK.get(s, ()) if paths.get(k)]
        if not keys:
            raise DataError(f"no feature file configured for split {s!r} (data.features.{s}=PATH)")
        chosen += [str(paths[k]) for k in keys]
    stores = [open_features(p) for p in dict.fromkeys(chosen)]
    return stores[0] if len(stores) == 1 else ChainedFeatures(stores)


class VQADataModule(pl.LightningDataModule):
    """VQA v2-format questions/answers (built-in set or real VQA v2) with one visual source.

    Loaders shard by rank themselves (`ShardSampler`): the training order depends on (seed, epoch)
    only and is restored mid-epoch on resume; under DDP every validation/test question is scored by
    exactly one rank. `seed` defaults to the one `seed_everything` set.
    `normalize_on_device`: the workers send resized uint8 pixels and the model normalises them on its
    device (the same values, a quarter of the bytes through the workers' queues and the host-to-GPU copy).
    `resize_on_device`: the workers only decode; the model resizes (`resize_batch_uint8`, the same bytes as
    Pillow) and normalises on its device. On a GPU that takes Pillow's resize, over a third of a worker's
    time per image, off the workers; on a CPU the torch resize is far slower than Pillow's: keep it off.
    """

    def __init__(
        self,
        data_root: str,
        source: str = "pixels",
        train_split: str | Sequence[str] = "train",
        val_split: str = "val",
        test_split: str = "test",
        image_size: Sequence[int] | None = (448, 448),
        short: int | None = None,
        max_size: int | None = None,
        norm: str | None = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        weights: str | None = None,
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
        normalize_on_device: bool = False,
        resize_on_device: bool = False,
    ) -> None:
        super().__init__()
        image_size, features, train_split = to_plain(image_size), to_plain(features), to_plain(train_split)
        pixel_mean, pixel_std = to_plain(pixel_mean), to_plain(pixel_std)
        self.save_hyperparameters()
        # Pixels are normalised as the backbone `weights` record (unset keys: taken from there).
        self.image_spec = (resolve_image_spec(self.hparams, weights, prefix="data.")
                           if source == "pixels" else None)
        self.vocab: AnswerVocab | None = None
        self.tokenizer = None
        self.datasets: dict[str, VQADataset] = {}

    def _load_vocab(self) -> None:
        if self.vocab is None:
            root = self.hparams.data_root
            from gridvqa.data.text import load_tokenizer

            self.vocab = AnswerVocab.load(layout.answers_path(root))
            self.tokenizer = load_tokenizer(layout.tokenizer_dir(root), self.hparams.max_length)

    def dataset(self, split: str | Sequence[str]) -> VQADataset:
        """The dataset of one split, or of several joined (a list such as [train, val, vg]: how MCAN
        trains for test-dev); cached, questions tokenised once up front."""
        names = split_names(split)
        key = "+".join(names)
        if key in self.datasets:
            return self.datasets[key]
        self._load_vocab()
        from gridvqa.data.text import encode

        hp = self.hparams
        entries = load_splits(hp.data_root, names)
        limit = hp.limit_train if names == split_names(hp.train_split) else hp.limit_val
        if limit:
            entries = entries[:limit]
        if not entries:
            raise DataError(f"{layout.questions_path(hp.data_root, names[0])}: no questions")
        q_ids, q_mask = encode(self.tokenizer, [e.question for e in entries], max_length=hp.max_length)
        features = None
        pipeline = None
        if hp.source == "pixels":
            on_device = hp.normalize_on_device or hp.resize_on_device
            pipeline = ImagePipeline.from_spec(self.image_spec, normalize=not on_device)
        else:
            features = split_features(hp.features or {}, names)
        ds = VQADataset(
            entries,
            q_ids,
            q_mask,
            self.vocab,
            names[0],
            hp.data_root,
            hp.source,
            pipeline,
            features,
            hp.group_by_image,
            keep_blind=names != split_names(hp.train_split),  # scoring splits count every question
            resize_on_device=hp.resize_on_device,
        )
        self.datasets[key] = ds
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset(self.hparams.train_split)
            self.dataset(self.hparams.val_split)
        elif stage == "validate":
            self.dataset(self.hparams.val_split)
        elif stage in ("test", "predict"):
            self.dataset(self.hparams.test_split)

    def loader(
        self, split: str | Sequence[str], shuffle: bool = False, batch_size: int | None = None
    ) -> ResumableDataLoader:
        """Training (`shuffle=True`): shuffled, shards padded to equal sizes; else in order, unpadded."""
        hp = self.hparams
        ds = self.dataset(split)
        kw = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        replicas, rank = int(kw.get("num_replicas", 1)), int(kw.get("rank", 0))
        if not shuffle and len(ds) < replicas:
            raise DataError(
                f"{layout.questions_path(hp.data_root, ds.split)}: {len(ds)} items for {replicas} processes; "
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
            pin_memory=self._on_cuda(),
        )

    def _on_cuda(self) -> bool:
        # page-locked batches let Lightning's non-blocking copy overlap the step (64x448x448 is 150 MB)
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.hparams.train_split, shuffle=True)

    def val_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.hparams.val_split)

    def test_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.hparams.test_split)
