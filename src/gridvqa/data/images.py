"""Image pipeline: robust loading, detectron2-style resizing, normalisation, flips and batching.

Conventions: as detectron2 (and so grid-feats-vqa), a detector input is the image in BGR 0-255 minus the
pixel mean and divided by the pixel std of the weights it feeds (std 1 for MSRA / Detectron1 weights, whose
std is folded into conv1; the ImageNet std for FAIR's Caffe2 ResNeXts, X-101 / X-152); shorter side 600 and
longer side at most 1000, bilinear; batches are padded bottom/right to a multiple of 32 (ImageList) with a
pixel mask saying which pixels are real.

`ImageSpec` is the one description of that conversion (resize rule, normalisation, flip); every user of
pixels (VQA and VG data, extraction, inference, the probes) builds its pipeline with `build_image_pipeline`,
which takes the normalisation recorded in the weights it feeds (see gridvqa.models.weights).

Only torch / torchvision / PIL / numpy here: datasets import this module in every worker.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gridvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DETECTRON2_MEAN = (103.530, 116.280, 123.675)  # BGR, 0-255
DETECTRON2_STD = (1.0, 1.0, 1.0)  # MSRA / Detectron1 weights: the std is folded into conv1
# FAIR's Caffe2 ResNeXts (X-101-32x8d, X-152-32x8d-IN5k): grid-feats-vqa configs/X-101-grid.yaml PIXEL_STD
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


def to_rgb(im: Image.Image) -> Image.Image:
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
            rgb = to_rgb(oriented)
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


_JPEG_SUFFIXES = (".jpg", ".jpeg")


def decode_rgb(path: str | Path) -> torch.Tensor:
    """`load_image` as a uint8 RGB CHW tensor, the same bytes (`ImagePipeline.decode` of it), for loaders
    that hand decoded pixels to the device. An RGB or grey JPEG is decoded by torchvision straight into a
    tensor (libjpeg-turbo with the same settings as Pillow's, its EXIF orientation applied: about 0.75 ms
    of Pillow's 3.1 ms per 640x480 image saved on a CPU here); anything else, and any file torchvision
    refuses, goes through `load_image`, whose ImageError names the file and what is wrong with it.
    """
    p = Path(path)
    if p.suffix.lower() in _JPEG_SUFFIXES and not ImageFile.LOAD_TRUNCATED_IMAGES:
        try:
            # the header only: format, mode, and Pillow's decompression-bomb check on the size
            with Image.open(p) as im:
                plain_jpeg = im.format == "JPEG" and im.mode in ("RGB", "L")
            if plain_jpeg:
                from torchvision.io import ImageReadMode, decode_jpeg, read_file

                data = read_file(str(p))
                return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except Exception:  # noqa: BLE001 - load_image below says what is wrong, in our words
            pass
    return ImagePipeline.decode(load_image(p))


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
    long side is at most `max_size`; round with int(x + 0.5), but never below 1 pixel."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max_size and max(newh, neww) > max_size:
        s = max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    # A thin strip (1x3000 at max 1000) would round a side to 0 pixels: keep at least one.
    return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))


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


def resize_text(resize: Resize) -> str:
    """The rule as feature files record it (provenance `resize`): `fixed HxW` or `shortest S, max M`."""
    if isinstance(resize, ResizeFixed):
        return f"fixed {resize.height}x{resize.width}"
    return f"shortest {resize.short}, max {resize.max_size}"


def resize_from_text(text: str) -> Resize | None:
    """The inverse of `resize_text` (one short side only); None for text it did not write."""
    fixed = re.fullmatch(r"fixed (\d+)x(\d+)", text)
    if fixed:
        return ResizeFixed(int(fixed[1]), int(fixed[2]))
    short = re.fullmatch(r"shortest (\d+), max (\d+|None)", text)
    if short:
        return ResizeShortest(int(short[1]), None if short[2] == "None" else int(short[2]))
    return None


# ---------------------------------------------------------------------------------------------------
# Resampling: Pillow's bilinear, on PIL images in the loader workers or on uint8 tensors on any device

# Pillow's fixed-point precision for 8-bit images (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2).
_PRECISION_BITS = 22


def resize_pil(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`img` resized to (h, w) with Pillow's antialiased bilinear filter (detectron2's ResizeTransform, so
    grid-feats-vqa's), one axis at a time: the horizontal pass, rounded to 8 bits, then the vertical one.

    Pillow's own two-axis resize runs the same two passes but picks their order by cost, which moves a few
    pixels by one level; fixing the order is what lets `resize_uint8` give the same bytes on a GPU.
    """
    h, w = size
    if min(h, w) <= 0:
        raise ValueError(f"resize: output size must be positive, got {h}x{w}")
    if img.width != w:
        img = img.resize((w, img.height), Image.Resampling.BILINEAR)
    if img.height != h:
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    return img


@functools.lru_cache(maxsize=4096)
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out, K] and fixed-point weights [out, K] of Pillow's bilinear resampling along one
    axis: the double-precision steps of Resample.c (precompute_coeffs, normalize_coeffs_8bpc) in the same
    order, so the integer weights are Pillow's own. Unused taps point at a valid index with weight 0."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter has support 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    index = xmin[:, None] + np.arange(ksize)[None, :]
    t = np.abs((index.astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
    used = np.arange(ksize)[None, :] < count[:, None]
    k = np.where(used & (t < 1.0), 1.0 - t, 0.0)
    total = np.cumsum(k, axis=1)[:, -1:]  # a running sum, as the C loop adds the taps one by one
    k = np.divide(k, total, out=k.copy(), where=total != 0.0)
    fixed = k * (1 << _PRECISION_BITS)
    weights = np.where(fixed < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed)).astype(np.int32)
    return np.minimum(index, in_size - 1), weights


@functools.lru_cache(maxsize=1024)
def _device_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed and copied to a GPU once per size pair: each copy of a pageable host array waits for
    # everything queued on the device, which would stall the batch before this one (`_device_constants`).
    index, weights = _bilinear_taps(in_size, out_size)
    return torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device)


@functools.lru_cache(maxsize=64)
def _device_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """float32 [C, 1, 1] on `device`, made once per device (a host-to-GPU copy of a Python list syncs)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(device)


def _resample(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """int32 [..., n, ...] -> int32 with `out_size` along `dim`, values 0..255, in Pillow's fixed-point
    arithmetic (the sums of 8-bit values times 22-bit weights fit int32, as in Pillow's C)."""
    idx, w = _device_taps(int(x.shape[dim]), out_size, x.device)
    shape = [1] * x.ndim
    shape[dim] = out_size
    acc = torch.full((), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(idx.shape[1]):  # a handful of taps: one gather and multiply-add each
        acc = acc + x.index_select(dim, idx[:, k]) * w[:, k].view(shape)
    return (acc >> _PRECISION_BITS).clamp_(0, 255)


def resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [..., H, W] on any device -> uint8 [..., h, w], bit-identical to `resize_pil`.

    Why not torchvision's resize: on a CPU with AVX2 it runs a uint8 kernel of its own (1 level off Pillow
    on a few pixels in a thousand), on a GPU a float one (1 level off on about a fifth of the pixels), so a
    GPU run would not see the pixels the CPU path sees. Integer arithmetic gives the same bytes everywhere.
    Slow on a CPU (gathers in torch); loader workers use `resize_pil`, which Pillow runs in C.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"resize_uint8 needs a uint8 image tensor, got {x.dtype}")
    h, w = size
    if min(h, w) <= 0:
        raise ValueError(f"resize_uint8: output size must be positive, got {h}x{w}")
    if tuple(x.shape[-2:]) == (h, w):
        return x
    y = x.to(torch.int32)
    if y.shape[-1] != w:
        y = _resample(y, -1, w)
    if y.shape[-2] != h:
        y = _resample(y, -2, h)
    return y.to(torch.uint8)


def _stacked_taps(
    in_sizes: Sequence[int], out_sizes: Sequence[int], padded: int, reverse: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    per_image = [_bilinear_taps(int(i), int(o)) for i, o in zip(in_sizes, out_sizes, strict=True)]
    k = max(ix.shape[1] for ix, _ in per_image)
    # padding: index 0 with weight 0 (an output of 0); fewer taps: weight-0 taps at the end
    index = np.zeros((len(per_image), padded, k), dtype=np.int64)
    weight = np.zeros((len(per_image), padded, k), dtype=np.int32)
    for b, ((ix, wt), flip) in enumerate(zip(per_image, reverse, strict=True)):
        if flip:  # a flip after the resize is the same taps in reverse output order
            ix, wt = ix[::-1], wt[::-1]
        index[b, : ix.shape[0], : ix.shape[1]] = ix
        weight[b, : wt.shape[0], : wt.shape[1]] = wt
    return torch.from_numpy(index), torch.from_numpy(weight)


def resize_taps(
    in_sizes: Sequence[tuple[int, int]],
    out_sizes: Sequence[tuple[int, int]],
    padded: tuple[int, int],
    flipped: Sequence[bool] | None = None,
    channels: int = 3,
) -> dict[str, torch.Tensor]:
    """The host side of `resize_batch_uint8`: image i of a batch (HWC, in_sizes[i] x `channels`, the images
    back to back in one flat buffer) goes to out_sizes[i], then is flipped left-right where flipped[i],
    into a batch of `padded` (h, w) zeroed outside each image.

    Built in numpy, in loader workers, so the tensors travel with the batch (pinned, copied without a
    wait) instead of being made on the main thread, where a host-to-GPU copy of pageable memory would wait
    for the queued step. Returns index int64 / weight int32 tensors [B, out, taps] per axis, and
    `row_start` int64 [B, C, H]: where each source row's first value of each channel lies in the flat
    buffer (rows past an image's height repeat its last one; no tap reads them).
    """
    flips = [bool(f) for f in flipped] if flipped is not None else [False] * len(in_sizes)
    h_index, h_weight = _stacked_taps([s[0] for s in in_sizes], [s[0] for s in out_sizes], padded[0],
                                      [False] * len(flips))
    w_index, w_weight = _stacked_taps([s[1] for s in in_sizes], [s[1] for s in out_sizes], padded[1], flips)
    hw = np.asarray(in_sizes, dtype=np.int64).reshape(-1, 2)
    plane = hw[:, 0] * hw[:, 1]
    start = np.concatenate([[0], np.cumsum(channels * plane)[:-1]])
    rows = np.minimum(np.arange(hw[:, 0].max())[None, :], hw[:, :1] - 1)  # [B, H]
    row_start = (start[:, None, None] + np.arange(channels)[None, :, None]
                 + rows[:, None, :] * (hw[:, 1, None, None] * channels))  # fmt: skip
    return {"h_index": h_index, "h_weight": h_weight, "w_index": w_index, "w_weight": w_weight,
            "row_start": torch.from_numpy(row_start)}


_HALF = 1 << (_PRECISION_BITS - 1)  # rounds the fixed-point sum to nearest


def resize_batch_uint8(flat: torch.Tensor, taps: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Decoded uint8 HWC images back to back in one flat buffer (`collate_unresized`) -> uint8
    [B, C, h, w] of `resize_taps`: every image resized (and flipped) as `resize_pil` would, bit for bit,
    with zeros outside it.

    One set of kernels for the whole batch, whatever the sizes in it (`resize_uint8` on a run of one size
    each would launch a set per size: a batch of COCO images has dozens), and no padded or transposed
    copy of the images on the host (HWC is how decoders lay pixels out): the horizontal pass reads each
    image where it lies in the buffer and writes channels first. Both passes always run; a pass to the
    same size has one tap of weight 1.0, so it changes nothing, as Pillow skipping it does. The sums fit
    int32 as in Pillow's C: 255 times weights that add up to 2**22.
    """
    if flat.dtype != torch.uint8 or flat.ndim != 1:
        raise ValueError(f"resize_batch_uint8 needs a flat uint8 buffer, got {flat.dtype} "
                         f"{tuple(flat.shape)}")
    source = flat.to(torch.int32)
    row_start = taps["row_start"][..., None]  # [B, C, H, 1]
    channels = row_start.shape[1]
    index, weight = taps["w_index"][:, None, None] * channels, taps["w_weight"][:, None, None]  # [B,1,1,w,K]
    acc = torch.full((), _HALF, dtype=torch.int32, device=flat.device)
    for k in range(index.shape[-1]):
        acc = acc + torch.take(source, row_start + index[..., k]) * weight[..., k]
    y = (acc >> _PRECISION_BITS).clamp_(0, 255)  # [B, C, H, w]: rounded to 8 bits between the passes
    index, weight = taps["h_index"][:, None, :, None], taps["h_weight"][:, None, :, None]  # [B, 1, h, 1, K]
    acc = torch.full((), _HALF, dtype=torch.int32, device=flat.device)
    for k in range(index.shape[-1]):
        acc = acc + torch.take_along_dim(y, index[..., k], dim=-2) * weight[..., k]
    return (acc >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


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
        # torchvision's normalize, with the constants kept on the device instead of copied every call
        return x.sub(_device_constants(self.mean, x.device)).div_(_device_constants(self.std, x.device))

    def to_dict(self) -> dict[str, Any]:
        """What weights files record (safetensors metadata `pixel_norm`, see gridvqa.models.weights)."""
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}

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


# What each family of weights expects. detectron2 / grid-feats-vqa: configs/R-50-grid.yaml keeps detectron2's
# default PIXEL_STD (defaults.py: [1, 1, 1], MSRA weights), configs/X-101-grid.yaml sets the ImageNet std;
# torchvision / timm ImageNet ResNets: RGB 0-1 with the ImageNet mean and std.
PIXEL_NORMS: dict[str, Normalization] = {
    "detectron2": Normalization("detectron2", DETECTRON2_MEAN, DETECTRON2_STD),
    "detectron2_x101": Normalization("detectron2", DETECTRON2_MEAN, DETECTRON2_X101_STD),
    "imagenet": Normalization("imagenet", IMAGENET_MEAN, IMAGENET_STD),
}


# ---------------------------------------------------------------------------------------------------
# The one image configuration

# Flat configs (conf/data/*.yaml, conf/extract.yaml) name the fields after what they mean there.
_SPEC_ALIASES = {"image_size": "size", "pixel_mean": "mean", "pixel_std": "std", "hflip_prob": "hflip"}


def _floats3(value: Any, key: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected 3 numbers (one per channel) or null") from None
    if len(out) != 3:
        raise ConfigError(f"{key}={list(out)}: expected 3 numbers (one per channel) or null")
    return out  # type: ignore[return-value]


def _check_size(value: Any, key: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        size = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"{key}={value!r}: expected [height, width], both > 0")
    return size  # type: ignore[return-value]


def _check_short(value: Any, key: str) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    try:
        scalar = isinstance(value, (int, float, np.integer, np.floating))
        shorts = (int(value),) if scalar else tuple(int(v) for v in value)
    except (TypeError, ValueError):
        shorts = ()
    if not shorts or min(shorts) <= 0:
        raise ConfigError(f"{key}={value!r}: expected a positive shorter side "
                          "(or a list of them to choose from)")
    return shorts[0] if len(shorts) == 1 else shorts


def _check_max_size(value: Any, key: str) -> int | None:
    if value is None:
        return None
    try:
        max_size = int(value)
    except (TypeError, ValueError):
        max_size = 0
    if max_size <= 0:
        raise ConfigError(f"{key}={value!r}: expected a size > 0 or null")
    return max_size


def _check_norm(value: Any, key: str) -> str | None:
    if value is not None and str(value) not in NORMS:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(NORMS)} or null "
                          "(null: as the weights record)")
    return None if value is None else str(value)


def _check_std(value: Any, key: str) -> tuple[float, float, float] | None:
    std = _floats3(value, key)
    if std is not None and min(std) <= 0:
        raise ConfigError(f"{key}={list(std)}: every std must be positive")
    return std


def _check_hflip(value: Any, key: str) -> float:
    try:
        hflip = float(value)
    except (TypeError, ValueError):
        hflip = -1.0
    if not 0.0 <= hflip <= 1.0:
        raise ConfigError(f"{key}={value!r}: expected a probability in [0, 1]")
    return hflip


@dataclass(frozen=True)
class ImageSpec:
    """How a decoded image becomes network input: the resize rule, the pixel normalisation and the flip.

    Resize: `size` (h, w) fixed, else shorter side `short` (a tuple: one chosen per image) with the longer
    side at most `max_size`. Normalisation: `norm` the kind (detectron2: BGR 0-255; imagenet: RGB 0-1),
    `mean` / `std` per channel in that order and range; None = "as the weights record, else the kind's
    default" (see `resolve_image_spec`). `keys` names the config keys the values came from, for errors.
    """

    size: tuple[int, int] | None = None
    short: int | tuple[int, ...] | None = None
    max_size: int | None = None
    norm: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    hflip: float = 0.0
    keys: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def key(self, name: str) -> str:
        return self.keys.get(name, name)

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "size": _check_size(self.size, self.key("size")),
            "short": _check_short(self.short, self.key("short")),
            "max_size": _check_max_size(self.max_size, self.key("max_size")),
        }
        if checked["size"] is None and checked["short"] is None:
            raise ConfigError(f"no resize rule: set {self.key('size')}=[H,W], or {self.key('short')}=S "
                              f"(and {self.key('max_size')}=M)")
        checked.update(
            norm=_check_norm(self.norm, self.key("norm")),
            mean=_floats3(self.mean, self.key("mean")),
            std=_check_std(self.std, self.key("std")),
            hflip=_check_hflip(self.hflip, self.key("hflip")),
            keys=dict(self.keys),
        )
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen dataclass: values made canonical once, here

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], prefix: str = "", **overrides: Any) -> ImageSpec:
        """The fields found in `cfg` (also under their flat-config names: image_size, pixel_mean,
        pixel_std, hflip_prob), other keys ignored; `prefix` + key name the config keys in errors."""
        names = {f.name for f in fields(cls)} - {"keys"}
        values: dict[str, Any] = {}
        keys: dict[str, str] = {}
        for k in cfg:
            name = _SPEC_ALIASES.get(str(k), str(k))
            if name in names:
                values[name], keys[name] = cfg[k], f"{prefix}{k}"
        values.update(overrides)
        return cls(**values, keys=keys)

    def to_dict(self) -> dict[str, Any]:
        """Plain json / yaml values; `ImageSpec.from_mapping(spec.to_dict()) == spec`."""
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name != "keys"}

    def resize(self) -> Resize:
        if self.size is not None:
            return ResizeFixed(*self.size)
        return ResizeShortest(self.short, self.max_size)  # type: ignore[arg-type]

    def normalization(self) -> Normalization:
        """The normalisation as configured, defaults for what is unset (no weights consulted)."""
        return Normalization.make(self.norm or "detectron2", self.mean, self.std)

    def resolved(self, recorded: Normalization | None, weights: str | os.PathLike | None = None) -> ImageSpec:
        """Norm, mean and std made explicit: the `recorded` normalisation of `weights` where there is one
        (a configured value that differs is a ConfigError naming the key and the file), else the config's,
        else the detectron2 default (std 1)."""
        if recorded is None:
            n = self.normalization()
        else:
            for name, given, rec in (("norm", self.norm, recorded.kind), ("mean", self.mean, recorded.mean),
                                     ("std", self.std, recorded.std)):
                if given is None:
                    continue
                same = given == rec if name == "norm" else np.allclose(given, rec, rtol=1e-5, atol=1e-6)
                if not same:
                    shown, trained = (given, rec) if name == "norm" else (list(given), list(rec))
                    raise ConfigError(
                        f"{self.key(name)}={shown} contradicts {weights}, whose weights were trained with "
                        f"pixel {name} {trained} (leave {self.key(name)} null to use it)")
            n = recorded
        return replace(self, norm=n.kind, mean=n.mean, std=n.std, keys=self.keys)


def resolve_image_spec(
    spec: ImageSpec | Mapping[str, Any], weights: str | os.PathLike | None = None, prefix: str = ""
) -> ImageSpec:
    """`spec` with the pixel normalisation made explicit from the `weights` file it will feed (safetensors
    metadata `pixel_norm`, written by gridvqa.models.convert and by VG pre-training's export)."""
    if not isinstance(spec, ImageSpec):
        spec = ImageSpec.from_mapping(spec, prefix)
    recorded = None
    if weights is not None:
        from gridvqa.models.weights import recorded_pixel_norm

        recorded = recorded_pixel_norm(weights)
    return spec.resolved(recorded, weights)


def build_image_pipeline(
    spec: ImageSpec | Mapping[str, Any], weights: str | os.PathLike | None = None, prefix: str = ""
) -> ImagePipeline:
    """The one way to get an image pipeline: from an ImageSpec (or a config mapping of its fields) and the
    weights file the images will feed, whose recorded normalisation is used (see `resolve_image_spec`)."""
    return ImagePipeline.from_spec(resolve_image_spec(spec, weights, prefix))


# ---------------------------------------------------------------------------------------------------
# Pipeline


class ImagePipeline:
    """PIL image (+ optional boxes) -> normalised CHW float32 tensor, boxes in the new pixels, info.

    Order: resize (Pillow's antialiased bilinear) -> optional horizontal flip -> normalise. `rng`
    (random.Random or numpy Generator) makes the random short-side choice and the flip reproducible.

    Two ways to run the same conversion: `__call__` on one image (in loader workers), or `unresized` there
    (`decode_rgb` / `decode` beforehand), `collate_unresized`, then `resize_batch_uint8` and
    `normalize_batch` on the model's device (extraction and training on a GPU); both resize with the same
    8-bit arithmetic (`resize_pil` / `resize_uint8` / `resize_batch_uint8`) and normalise with the same
    float ops.
    With `normalize=False`, `__call__` stops before normalising and returns uint8 (a quarter of the bytes
    to move from the workers to the GPU); `normalize_batch` finishes the conversion where the batch is.
    """

    def __init__(
        self,
        resize: Resize,
        norm: str = "detectron2",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hflip_prob: float = 0.0,
        normalize: bool = True,
    ) -> None:
        if not 0.0 <= float(hflip_prob) <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.resize = resize
        self.normalization = Normalization.make(norm, mean, std)
        self.hflip_prob = float(hflip_prob)
        self.normalize = bool(normalize)

    @classmethod
    def from_spec(cls, spec: ImageSpec, normalize: bool = True) -> ImagePipeline:
        try:
            return cls(spec.resize(), spec.norm or "detectron2", spec.mean, spec.std, spec.hflip, normalize)
        except ValueError as e:
            raise ConfigError(f"image pipeline: {e}") from None

    @staticmethod
    def decode(img: Image.Image) -> torch.Tensor:
        """A decoded image as a uint8 RGB CHW tensor (a view of Pillow's HWC bytes)."""
        return TF.pil_to_tensor(img if img.mode == "RGB" else to_rgb(img))

    def __call__(
        self,
        img: Image.Image | torch.Tensor,
        boxes: torch.Tensor | None = None,
        rng: RandomSource | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        if isinstance(img, Image.Image):
            img = img if img.mode == "RGB" else to_rgb(img)
            h, w = img.height, img.width
        else:
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(f"expected an RGB image tensor (3, H, W), got shape {tuple(img.shape)}")
            h, w = int(img.shape[-2]), int(img.shape[-1])
        nh, nw = self.resize.output_size(h, w, rng)
        if isinstance(img, Image.Image):
            x = TF.pil_to_tensor(resize_pil(img, (nh, nw)))
        else:
            x = resize_uint8(img, (nh, nw))
        sy, sx = nh / h, nw / w
        flipped = self.hflip_prob > 0 and _uniform(rng) < self.hflip_prob
        if flipped:
            x = TF.horizontal_flip(x)
        if boxes is not None:
            boxes = _transform_boxes(boxes, sx, sy, nw if flipped else None)
        info = {"orig_size": (h, w), "size": (nh, nw), "scale": (sy, sx), "flipped": bool(flipped)}
        return (self.normalization(x) if self.normalize else x), boxes, info

    def unresized(
        self, img: Image.Image | torch.Tensor, rng: RandomSource | None = None
    ) -> tuple[torch.Tensor, dict]:
        """`__call__`'s decisions without its work: the decoded uint8 image (`img` itself when it is one
        already, from `decode_rgb`) and the info `__call__` gives (the same random draws, in the same
        order); `collate_unresized` and `resize_batch_uint8` finish the conversion on the model's device
        with the same bytes."""
        x = img if isinstance(img, torch.Tensor) else self.decode(img)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        nh, nw = self.resize.output_size(h, w, rng)
        flipped = self.hflip_prob > 0 and _uniform(rng) < self.hflip_prob
        info = {"orig_size": (h, w), "size": (nh, nw), "scale": (nh / h, nw / w), "flipped": bool(flipped)}
        return x, info

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


def batch_buffer(shape: Sequence[int], dtype: torch.dtype, fill: float | None = 0) -> torch.Tensor:
    """A tensor full of `fill` (None: to be overwritten whole) to collate into; in a loader worker, in
    shared memory, as torch's default_collate makes its batches: handing it to the main process then
    copies nothing (a batch made in private memory is copied into shared memory on its way), and fresh
    shared pages are already zero."""
    from torch.utils.data import get_worker_info

    shape = tuple(int(n) for n in shape)
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype) if fill is None else torch.full(shape, fill, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    out = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)
    return out.fill_(fill) if fill else out


def _padded_size(sizes: torch.Tensor, size_divisibility: int) -> tuple[int, int]:
    """(h, w) of a batch of images of `sizes` [B, 2], rounded up to a multiple of `size_divisibility`."""
    hmax, wmax = (int(v) for v in sizes.max(dim=0).values)
    d = max(1, int(size_divisibility))
    return -(-hmax // d) * d, -(-wmax // d) * d


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
    hmax, wmax = _padded_size(sizes, size_divisibility)
    if tensors[0].device.type == "cpu":
        batch = batch_buffer((len(tensors), c, hmax, wmax), tensors[0].dtype, pad_value)
        mask = batch_buffer((len(tensors), hmax, wmax), torch.bool)
    else:
        batch = tensors[0].new_full((len(tensors), c, hmax, wmax), pad_value)
        mask = torch.zeros(len(tensors), hmax, wmax, dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        h, w = t.shape[-2:]
        batch[i, :, :h, :w] = t
        mask[i, :h, :w] = True
    return batch, mask, sizes


def collate_unresized(
    tensors: Sequence[torch.Tensor],
    sizes: Sequence[tuple[int, int]],
    flipped: Sequence[bool] | None = None,
    size_divisibility: int = 32,
) -> dict[str, Any]:
    """`unresized` images -> what `collate_images` gives of the resized ones, with the resize left to do:
    `raw_pixels` (uint8, the decoded images back to back, each HWC: one plain copy each, no padding, and
    none at all for the copy a decoder's HWC buffer would need to become CHW), `resize_taps` (for
    `resize_batch_uint8`, whose output has the padded size of the resized batch), `pixel_mask` and
    `image_sizes` of the resized images."""
    if not tensors:
        raise ValueError("collate_unresized needs at least one image")
    for t in tensors:
        if t.ndim != 3 or t.shape[0] != tensors[0].shape[0] or t.dtype != torch.uint8:
            raise ValueError(f"collate_unresized: expected uint8 (C, H, W) images, got {t.dtype} "
                             f"{tuple(t.shape)}")
    raw = batch_buffer((sum(t.numel() for t in tensors),), torch.uint8, fill=None)
    torch.cat([t.permute(1, 2, 0).reshape(-1) for t in tensors], out=raw)  # a view of a decoder's buffer
    out_sizes = torch.tensor([[int(h), int(w)] for h, w in sizes], dtype=torch.long)
    hmax, wmax = _padded_size(out_sizes, size_divisibility)
    mask = batch_buffer((len(sizes), hmax, wmax), torch.bool)
    for i, (h, w) in enumerate(out_sizes.tolist()):
        mask[i, :h, :w] = True
    in_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
    taps = resize_taps(in_sizes, out_sizes.tolist(), (hmax, wmax), flipped, channels=int(tensors[0].shape[0]))
    return {"raw_pixels": raw, "resize_taps": taps, "pixel_mask": mask, "image_sizes": out_sizes}


def normalize_batch(
    images: torch.Tensor, mask: torch.Tensor, norm: Normalization | Mapping[str, Any]
) -> torch.Tensor:
    """A padded uint8 batch from `collate_images` -> the float batch it makes of normalised images: the
    same float ops per pixel, then the padding set to 0 (the mean colour), as normalising before padding."""
    if not isinstance(norm, Normalization):
        norm = Normalization.make(norm["kind"], norm["mean"], norm["std"])
    return torch.where(mask[:, None], norm(images), 0.0)


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
