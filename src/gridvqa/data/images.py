"""Image pipeline: robust loading, detectron2-style resizing, normalisation, flips and batching.

Conventions (see /work/shared/DESIGN.md): the detector recipe feeds BGR 0-255 images minus the
pixel mean, shorter side 600 and longer side at most 1000, bilinear; batches are padded bottom/right
to a multiple of 32 (detectron2's ImageList) with a pixel mask saying which pixels are real.

Only torch / torchvision / PIL / numpy here: datasets import this module in every worker.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gridvqa.errors import DataError

log = logging.getLogger(__name__)

DETECTRON2_MEAN = (103.530, 116.280, 123.675)  # BGR, 0-255
DETECTRON2_STD = (1.0, 1.0, 1.0)
DETECTRON2_X101_STD = (57.375, 57.120, 58.395)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, 0-1
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = ("detectron2", "imagenet")


class ImageError(DataError):
    """An image file cannot be used; `kind` is one of missing, empty, truncated, undecodable."""

    def __init__(self, path: str | Path, kind: str, reason: str) -> None:
        self.path = Path(path)
        self.kind = kind
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ---------------------------------------------------------------------------------------------------
# Loading


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels are composited on white (not dropped), because the
    colour stored under alpha=0 is arbitrary (often black) and would show up as spurious content."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" or mode == "PA":
        # Palette transparency lives in info["transparency"]; going through RGBA keeps it.
        im = im.convert("RGBA") if (mode == "PA" or "transparency" in im.info) else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "RGBa", "La"):
        im = im.convert("RGBA")  # also un-premultiplies RGBa/La
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(im)
    # 1, L, CMYK, YCbCr, LAB, HSV, RGBX: PIL's own conversion is correct for these.
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float grey -> 8-bit by range, not by clipping (PIL's convert clips at 255).

    I;16 and I (PIL opens 16-bit PNG as one of them) are taken as 0-65535 when any value exceeds 255,
    else as 0-255 already; F is taken as 0-1 when its maximum is at most 1, else as 0-255.
    """
    arr = np.asarray(im).astype(np.float64)
    vmax = float(arr.max()) if arr.size else 0.0
    if im.mode == "F":
        arr = arr * 255.0 if vmax <= 1.0 else arr
    elif vmax > 255.0:
        arr = arr / 257.0  # 65535 -> 255 exactly
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode a whole image file into RGB with its EXIF orientation applied.

    Raises ImageError (a DataError) naming the file for missing, empty, truncated or undecodable files.
    """
    p = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched PIL to padding truncated files with grey; we would train on half images.
        raise DataError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; gridvqa needs it False to detect broken images"
        )
    if not p.is_file():
        raise ImageError(p, "missing", "image file not found" if not p.exists() else "not a regular file")
    if p.stat().st_size == 0:
        raise ImageError(p, "empty", "empty image file (0 bytes)")
    try:
        with Image.open(p) as im:
            im.load()  # full decode: truncation only shows up here
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception as e:  # broken EXIF metadata does not make the pixels unusable
                log.warning("%s: ignoring unreadable EXIF orientation (%s)", p, e)
                oriented = im
            rgb = _to_rgb(oriented)
            if rgb is im:
                rgb = im.copy()  # detach from the closed file
    except UnidentifiedImageError:
        raise ImageError(p, "undecodable", "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(p, "undecodable", f"refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        text = str(e) or type(e).__name__
        low = text.lower()
        if isinstance(e, EOFError) or "truncated" in low or "broken data stream" in low or "premature" in low:
            raise ImageError(p, "truncated", f"truncated image data ({text})") from None
        raise ImageError(p, "undecodable", f"corrupt image data ({text})") from None
    return rgb


class SkipCounter:
    """Counts files a dataset skipped, so one broken image never ends an epoch but is not forgotten.

    Thread-safe; with DataLoader worker processes each worker holds its own copy.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, path: str | Path, reason: str) -> None:
        with self._lock:
            self._items.append((str(path), str(reason)))

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._items)

    def summary(self, limit: int = 5) -> str:
        items = self.items
        if not items:
            return "no images skipped"
        head = "; ".join(f"{p} ({r})" for p, r in items[:limit])
        more = f"; and {len(items) - limit} more" if len(items) > limit else ""
        return f"{len(items)} image(s) skipped: {head}{more}"

    def __len__(self) -> int:
        return self.count


def safe_load_image(path: str | Path, counter: SkipCounter | None = None) -> Image.Image | None:
    """`load_image`, but a bad file is logged, counted and returned as None instead of raising."""
    try:
        return load_image(path)
    except ImageError as e:
        log.warning("skipping image: %s", e)
        if counter is not None:
            counter.add(path, e.reason)
        return None


# ---------------------------------------------------------------------------------------------------
# Resizing


class RandomSource(Protocol):
    """random.Random and numpy.random.Generator both have `.random()` returning a float in [0, 1)."""

    def random(self) -> float: ...


def _uniform(rng: RandomSource | None) -> float:
    # None -> Python's global RNG, which PyTorch's DataLoader seeds differently in every worker.
    return float(rng.random()) if rng is not None else random.random()


def shortest_edge_size(h: int, w: int, short: int, max_size: int | None) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge.get_output_shape: scale the short side to `short`, then shrink so the
    long side is at most `max_size`; round with int(x + 0.5)."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max_size and max(newh, neww) > max_size:
        s = max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    return int(newh + 0.5), int(neww + 0.5)


@dataclass(frozen=True)
class ResizeShortest:
    """Shorter side to `short` (a tuple: one chosen at random per image, detectron2 "choice"),
    longer side at most `max_size` (None: no cap)."""

    short: int | tuple[int, ...] = 600
    max_size: int | None = 1000

    def __post_init__(self) -> None:
        short = self.short
        # Hydra hands over ListConfig; keep a hashable tuple.
        shorts = (int(short),) if isinstance(short, (int, np.integer)) else tuple(int(s) for s in short)
        if not shorts or min(shorts) <= 0:
            raise ValueError(f"ResizeShortest: short must be positive, got {short!r}")
        if self.max_size is not None and int(self.max_size) <= 0:
            raise ValueError(f"ResizeShortest: max_size must be positive or None, got {self.max_size!r}")
        object.__setattr__(self, "short", shorts[0] if len(shorts) == 1 else shorts)

    @property
    def choices(self) -> tuple[int, ...]:
        return self.short if isinstance(self.short, tuple) else (self.short,)

    def output_size(self, h: int, w: int, rng: RandomSource | None = None) -> tuple[int, int]:
        choices = self.choices
        k = 0 if len(choices) == 1 else min(int(_uniform(rng) * len(choices)), len(choices) - 1)
        short = choices[k]
        return shortest_edge_size(h, w, short, self.max_size)


@dataclass(frozen=True)
class ResizeFixed:
    """Every image to exactly height x width (aspect ratio not kept)."""

    height: int
    width: int

    def __post_init__(self) -> None:
        if int(self.height) <= 0 or int(self.width) <= 0:
            raise ValueError(f"ResizeFixed: size must be positive, got {self.height}x{self.width}")

    def output_size(self, h: int, w: int, rng: RandomSource | None = None) -> tuple[int, int]:
        return int(self.height), int(self.width)


Resize = ResizeShortest | ResizeFixed


# ---------------------------------------------------------------------------------------------------
# Normalisation


@dataclass(frozen=True)
class Normalization:
    """How a uint8 RGB image becomes the network input: channel order, value range, mean and std."""

    kind: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def bgr(self) -> bool:
        return self.kind == "detectron2"

    @property
    def range_max(self) -> float:
        return 255.0 if self.kind == "detectron2" else 1.0

    @classmethod
    def make(cls, kind: str = "detectron2", mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> Normalization:
        """Defaults per kind; `mean`/`std` are in the kind's own channel order and range."""
        if kind == "detectron2":
            m, s = DETECTRON2_MEAN, DETECTRON2_STD
        elif kind == "imagenet":
            m, s = IMAGENET_MEAN, IMAGENET_STD
        else:
            raise ValueError(f"unknown normalisation {kind!r}; expected one of {NORMS}")
        m = tuple(float(x) for x in (mean if mean is not None else m))
        s = tuple(float(x) for x in (std if std is not None else s))
        if len(m) != 3 or len(s) != 3 or min(s) <= 0:
            raise ValueError(f"normalisation needs 3 means and 3 positive stds, got mean={m}, std={s}")
        return cls(kind, m, s)  # type: ignore[arg-type]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) RGB CHW -> normalised float32 CHW."""
        x = img.to(torch.float32)
        if self.bgr:
            x = x.flip(-3)
        if self.range_max != 255.0:
            x = x / 255.0
        return TF.normalize(x, list(self.mean), list(self.std))

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Network input -> uint8 RGB CHW (for pictures)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        y = x * std + mean
        if self.range_max != 255.0:
            y = y * 255.0
        if self.bgr:
            y = y.flip(-3)
        return y.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# Pipeline


class ImagePipeline:
    """PIL image (+ optional boxes) -> normalised CHW float32 tensor, boxes in the new pixels, info.

    Order: resize (bilinear, antialiased) -> optional horizontal flip -> normalise. `rng` (random.Random
    or numpy Generator) makes the random short-side choice and the flip reproducible.
    """

    def __init__(
        self,
        resize: Resize,
        norm: str = "detectron2",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hflip_prob: float = 0.0,
    ) -> None:
        if not 0.0 <= float(hflip_prob) <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.resize = resize
        self.normalization = Normalization.make(norm, mean, std)
        self.hflip_prob = float(hflip_prob)

    def __call__(
        self,
        img: Image.Image | torch.Tensor,
        boxes: torch.Tensor | None = None,
        rng: RandomSource | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        if isinstance(img, Image.Image):
            x = TF.pil_to_tensor(img if img.mode == "RGB" else _to_rgb(img))
        else:
            x = img
            if x.ndim != 3 or x.shape[0] != 3:
                raise ValueError(f"expected an RGB image tensor (3, H, W), got shape {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        nh, nw = self.resize.output_size(h, w, rng)
        if (nh, nw) != (h, w):
            x = TF.resize(x, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        sy, sx = nh / h, nw / w
        flipped = self.hflip_prob > 0 and _uniform(rng) < self.hflip_prob
        if flipped:
            x = TF.horizontal_flip(x)
        if boxes is not None:
            boxes = _transform_boxes(boxes, sx, sy, nw if flipped else None)
        info = {"orig_size": (h, w), "size": (nh, nw), "scale": (sy, sx), "flipped": bool(flipped)}
        return self.normalization(x), boxes, info

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalization.denormalize(x)


def _transform_boxes(boxes: torch.Tensor, sx: float, sy: float, flip_width: int | None) -> torch.Tensor:
    # Two lines of arithmetic; wrapping in tv_tensors.BoundingBoxes would add nothing but ceremony.
    b = torch.as_tensor(boxes, dtype=torch.float32)
    if b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4) x1,y1,x2,y2, got shape {tuple(b.shape)}")
    b = b * torch.tensor([sx, sy, sx, sy], dtype=b.dtype)
    if flip_width is not None:
        b = torch.stack([flip_width - b[:, 2], b[:, 1], flip_width - b[:, 0], b[:, 3]], dim=1)
    return b


# ---------------------------------------------------------------------------------------------------
# Batching


def collate_images(
    tensors: Sequence[torch.Tensor], size_divisibility: int = 32, pad_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad CHW images bottom/right to a common size, a multiple of `size_divisibility` (detectron2 ImageList).

    Returns (batch [B, C, H, W], mask [B, H, W] bool, True = real pixel, sizes [B, 2] long (h, w)).
    pad_value 0 after normalisation pads with the mean colour, as detectron2 does.
    """
    if len(tensors) == 0:
        raise ValueError("collate_images needs at least one image")
    c = tensors[0].shape[0]
    for t in tensors:
        if t.ndim != 3 or t.shape[0] != c:
            raise ValueError(f"collate_images: expected ({c}, H, W) tensors, got {tuple(t.shape)}")
    sizes = torch.tensor([[int(t.shape[-2]), int(t.shape[-1])] for t in tensors], dtype=torch.long)
    hmax, wmax = (int(v) for v in sizes.max(dim=0).values)
    if size_divisibility > 1:
        d = int(size_divisibility)
        hmax, wmax = -(-hmax // d) * d, -(-wmax // d) * d
    batch = tensors[0].new_full((len(tensors), c, hmax, wmax), pad_value)
    mask = torch.zeros(len(tensors), hmax, wmax, dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        h, w = t.shape[-2:]
        batch[i, :, :h, :w] = t
        mask[i, :h, :w] = True
    return batch, mask, sizes


def feature_mask(mask: torch.Tensor, feat_hw: Sequence[int], stride: int | None = None) -> torch.Tensor:
    """Which cells of a [h, w] feature map see real pixels: bool [B, h, w].

    Rule: a cell is valid when its index < ceil(valid_size / stride) along each axis, i.e. it covers at
    least one real pixel — the same count as the extracted grid of an unpadded image, ceil(H / 32).
    `stride` defaults to padded_size / feature_size (exact when the batch was padded to a multiple of it).
    """
    if mask.ndim != 3:
        raise ValueError(f"feature_mask: expected a [B, H, W] pixel mask, got shape {tuple(mask.shape)}")
    fh, fw = int(feat_hw[0]), int(feat_hw[1])
    H, W = mask.shape[-2:]
    sh = float(stride) if stride else H / fh
    sw = float(stride) if stride else W / fw
    valid_h = mask.any(dim=2).sum(dim=1).to(torch.float64)  # mask is a top-left rectangle per image
    valid_w = mask.any(dim=1).sum(dim=1).to(torch.float64)
    cells_h = torch.ceil(valid_h / sh - 1e-9)
    cells_w = torch.ceil(valid_w / sw - 1e-9)
    rows = torch.arange(fh, device=mask.device, dtype=torch.float64)
    cols = torch.arange(fw, device=mask.device, dtype=torch.float64)
    return (rows[None, :, None] < cells_h[:, None, None]) & (cols[None, None, :] < cells_w[:, None, None])
