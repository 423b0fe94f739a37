"""One image and one question as a VQA model's batch, and the model's top answers to it.

What `gridvqa.inference.predict` and `gridvqa.viz.explain` feed a checkpoint: the question tokenised as
the checkpoint was trained (its tokenizer and length), and the image's visual input for the model's
source: pixels through the checkpoint's evaluation image pipeline (no flips), or, for grid_h5 /
region_h5 models, the image's stored features from their HDF5 file, checked against the picture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gridvqa.errors import ConfigError, DataError
from gridvqa.inference import DEFAULT_MAX_LENGTH, DEFAULT_SIZE_DIVISIBILITY, batch_to, image_pipeline

if TYPE_CHECKING:
    from PIL import Image

    from gridvqa.data.features import GridFeatures, RegionFeatures
    from gridvqa.lit.vqa_module import VQAModule


@dataclass
class QuestionBatch:
    """A one-question batch on the model's device, with what is needed to read the model's output."""

    batch: dict[str, Any]
    q_ids: torch.Tensor  # [1, T] token ids (cpu)
    q_mask: torch.Tensor  # [1, T] True on the question's words (cpu)
    resized_hw: tuple[int, int] | None = None  # pixels: the size the image pipeline resized to
    reader: GridFeatures | RegionFeatures | None = None  # grid_h5 / region_h5: the opened feature file
    stored: Mapping[str, Any] | None = None  # grid_h5 / region_h5: the image's stored item

    @property
    def words(self) -> torch.Tensor:
        """Positions of the question's words (padding dropped)."""
        return self.q_mask[0].nonzero().flatten()


def check_question(question: str, topk: int) -> None:
    """The cheap argument checks, before anything slow is loaded."""
    if not isinstance(question, str) or not question.strip():
        raise ConfigError('the question is empty: ask something, e.g. question="what color is the circle?"')
    if int(topk) < 1:
        raise ConfigError(f"topk={topk}: must be at least 1")


def read_picture(image: str | Path | Image.Image) -> Image.Image:
    """An image file (decoded as training reads it) or a PIL image, as 8-bit RGB."""
    from PIL import Image as PILImage

    from gridvqa.data.images import load_image, to_rgb

    return to_rgb(image) if isinstance(image, PILImage.Image) else load_image(image)


def open_features(features: str | Path | GridFeatures | RegionFeatures, source: str):
    """The feature reader a grid_h5 / region_h5 model needs; a path is opened and its kind checked."""
    from gridvqa.data.features import open_features as _open

    reader = _open(features) if isinstance(features, (str, Path)) else features
    want = "grid" if source == "grid_h5" else "region"
    if reader.kind != want:
        raise DataError(f"{reader.path}: a {reader.kind} feature file, but the model reads {want} features")
    return reader


def encode_question(module: VQAModule, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [1, T] with the checkpoint's tokenizer and question length."""
    from gridvqa.data.text import encode

    q_ids, q_mask = encode(module.tokenizer, [question],
                           max_length=getattr(module, "question_max_length", DEFAULT_MAX_LENGTH))
    if not bool(q_mask.any()):
        raise ConfigError(f"the question {question!r} has no words once punctuation is removed")
    return q_ids, q_mask


def question_batch(
    module: VQAModule,
    question: str,
    picture: Image.Image,
    features: str | Path | GridFeatures | RegionFeatures | None = None,
    image_id: int | None = None,
) -> QuestionBatch:
    """The batch `module` answers `question` about `picture` from (on the module's device).

    source=pixels reads `picture`; grid_h5 / region_h5 read image `image_id` of `features`, which must
    have the picture's size."""
    q_ids, q_mask = encode_question(module, question)
    orig_hw = (picture.height, picture.width)
    batch: dict[str, Any] = {"q_ids": q_ids, "q_mask": q_mask, "img_index": torch.zeros(1, dtype=torch.long),
                             "orig_size": torch.tensor([orig_hw])}
    out = QuestionBatch(batch, q_ids, q_mask)
    source = module.hparams.source
    if source == "pixels":
        out.resized_hw = _add_pixels(batch, module, picture)
    else:
        out.reader, out.stored = _add_stored_features(batch, source, orig_hw, features, image_id)
    out.batch = batch_to(batch, next(module.parameters()).device)
    return out


def _add_pixels(batch: dict[str, Any], module: VQAModule, picture: Image.Image) -> tuple[int, int]:
    from gridvqa.data.images import collate_images

    tensor, _, info = image_pipeline(module)(picture)
    size_div = getattr(module, "size_divisibility", DEFAULT_SIZE_DIVISIBILITY)
    batch["images"], batch["pixel_mask"], batch["image_sizes"] = collate_images([tensor], size_div)
    return info["size"]


def _add_stored_features(
    batch: dict[str, Any],
    source: str,
    orig_hw: tuple[int, int],
    features: str | Path | GridFeatures | RegionFeatures | None,
    image_id: int | None,
) -> tuple[GridFeatures | RegionFeatures, Mapping[str, Any]]:
    if features is None or image_id is None:
        raise ConfigError(f"this checkpoint reads {source} features: give its feature file "
                          "(features=PATH) and the image's id in it (image_id)")
    reader = open_features(features, source)
    try:
        item = reader.get(int(image_id))
    except KeyError:
        raise DataError(f"{reader.path}: image {image_id} is not in the feature file") from None
    stored = tuple(int(v) for v in item["image_size"])
    if stored != orig_hw:
        raise DataError(f"{reader.path}: image {image_id} is {stored[1]}x{stored[0]} (w x h) there, but "
                        f"the picture given is {orig_hw[1]}x{orig_hw[0]}: not the same image")
    if source == "grid_h5":
        grid = torch.from_numpy(np.asarray(item["grid"], dtype=np.float32))[None]
        batch["grid"], batch["grid_mask"] = grid, torch.ones(grid.shape[:3], dtype=torch.bool)
    else:
        regions = torch.from_numpy(np.asarray(item["features"], dtype=np.float32))[None]
        batch["regions"], batch["region_mask"] = regions, torch.ones(regions.shape[:2], dtype=torch.bool)
        batch["boxes"] = torch.from_numpy(np.asarray(item["boxes"], dtype=np.float32))[None]
    return reader, item


def top_answers(module: VQAModule, logits: torch.Tensor, topk: int) -> list[tuple[str, float]]:
    """The `topk` most likely answers of one question's logits [A] with their sigmoid scores, best first."""
    probs = logits.float().sigmoid().cpu()
    scores, idx = probs.topk(min(int(topk), probs.numel()))
    return [(module.answers[i], float(s)) for i, s in zip(idx.tolist(), scores.tolist(), strict=True)]
