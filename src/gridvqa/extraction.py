"""Feature extraction to HDF5: grid (res5 map) or region (bottom-up C4 boxes) features of a split's images.

`run(cfg)` is the body of `python -m gridvqa.extract` (config: conf/extract.yaml). The pieces are public so
benchmarks (gridvqa.benchmarks.extraction) and tests can drive them directly:

    items = split_images(data_root, "val")              # or folder_images(DIR, id_map_path)
    model, provenance = build_extractor(cfg)              # GridExtractor | RegionExtractor (+ what made it)
    summary = extract(items, model, pipeline, writer, ...)

The models and their builders live in gridvqa.models.extractors; several processes (shards, torchrun) and
the merge of their part files in gridvqa.extraction_shards.

The loop: DataLoader workers decode images (and, with preprocess=workers, resize and normalise them);
batches hold images of one padded shape, pinned on a GPU and copied without blocking; with
preprocess=device the uint8 pixels are resized and normalised on the GPU to the same bytes; the forward
runs under inference_mode (optionally bfloat16 autocast, channels_last, a compiled backbone); maps come
back in one copy per batch and a background writer thread commits them while the next batch runs.

Nothing is lost: the FeatureWriter commits finished images atomically and a re-run skips `done_ids`.
A batch only holds images of one padded shape (see `plan_batches`), so every image's features equal a
forward of that image alone: they do not depend on batch_size or on where an interrupted run resumed.
Unreadable images are skipped, logged and listed in `<output>.skipped.json` (file, reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gridvqa.data import layout
from gridvqa.data.features import FeatureWriter
from gridvqa.data.images import (
    ImageError,
    ImagePipeline,
    ImageSpec,
    Resize,
    ResizeFixed,
    collate_images,
    collate_unresized,
    normalize_batch,
    resize_batch_uint8,
    resize_text,
    resolve_image_spec,
)
from gridvqa.data.jsonio import atomic_write_json, load_json
from gridvqa.devices import resolve_device
from gridvqa.errors import ConfigError, DataError
from gridvqa.models.extractors import (
    GridExtractor,
    RegionExtractor,
    WeightsSource,
    build_grid_model,
    build_region_model,
)

log = logging.getLogger(__name__)

KINDS = ("grid", "region")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
# where images are resized and normalised: loader workers, or the extraction device (resolve_preprocess)
PREPROCESS = ("workers", "device")
# Which training run makes the default weights of each kind (named in the "weights not found" error).
TRAIN_COMMAND = {"grid": "pretrain_vg", "region": "pretrain_vg_c4"}
# Batches pad to a multiple of the backbone's largest stride (res5, 32), as detectron2's ImageList.
SIZE_DIVISIBILITY = 32
_COCO_NAME = re.compile(r"(?:.*[_-])?(\d+)")  # COCO_val2014_000000000042 -> 42, VG 2345 -> 2345


# ---------------------------------------------------------------------------------------------------
# Which images


@dataclass(frozen=True)
class ImageItem:
    image_id: int
    path: Path


def split_images(data_root: str | os.PathLike, split: str) -> list[ImageItem]:
    """The images referenced by a split's questions file (official layout), sorted by id."""
    from gridvqa.data.vqa2 import read_questions

    qpath = layout.questions_path(data_root, split)
    if not qpath.is_file():
        raise DataError(f"{qpath}: VQA questions file not found (split {split!r} under {data_root})")
    ids = sorted({int(q["image_id"]) for q in read_questions(qpath)})
    if not ids:
        raise DataError(f"{qpath}: no questions, so no images to extract")
    return [ImageItem(i, layout.coco_image_path(data_root, split, i)) for i in ids]


def folder_images(folder: str | os.PathLike, id_map: str | os.PathLike) -> list[ImageItem]:
    """Every image file under `folder` (recursively), sorted by relative path.

    Ids come from COCO / VG style names (the trailing digits of the stem) when every name has one and they
    are unique; otherwise from the json file `id_map` ({relative path: id}): names keep the id they carry,
    the others get a running index above them, and later runs extend the map without renumbering.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    map_path = Path(id_map)
    known: dict[str, int] = {}
    if not map_path.exists():
        matches = [_COCO_NAME.fullmatch(p.stem) for p in files]
        ids = [int(m.group(1)) if m else None for m in matches]
        if None not in ids and len(set(ids)) == len(ids):
            return [ImageItem(i, p) for i, p in zip(ids, files, strict=True)]  # type: ignore[arg-type]
        # a new map keeps the ids the names carry (a file extracted before by name keeps its id)
        taken: set[int] = set()
        for p, i in zip(files, ids, strict=True):
            if i is not None and i not in taken:
                known[p.relative_to(root).as_posix()] = i
                taken.add(i)
    else:
        data = load_json(map_path, "image id map")
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise DataError(f"{map_path}: not an image id map (expected {{file name: integer id}})")
        known = dict(data)
        if len(set(known.values())) != len(known):
            raise DataError(f"{map_path}: image id map gives two files the same id")
    next_id = max(known.values(), default=-1) + 1
    changed = not map_path.exists()
    items = []
    for p in files:
        name = p.relative_to(root).as_posix()
        if name not in known:
            known[name], next_id, changed = next_id, next_id + 1, True
        items.append(ImageItem(known[name], p))
    if changed:
        atomic_write_json(map_path, known, indent=0)
        log.info("image ids of %s written to %s", root, map_path)
    return items


def _header_size(path: Path) -> tuple[int, int]:
    """(h, w) as `load_image` will see it (EXIF rotation swaps sides); (0, 0) for an unreadable header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            with contextlib.suppress(Exception):  # broken EXIF: load_image ignores it too
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
            return h, w
    except Exception:  # noqa: BLE001 - any failure here is reported by the worker that decodes the file
        return 0, 0


def _padded(hw: tuple[int, int]) -> tuple[int, int]:
    d = SIZE_DIVISIBILITY
    return -(-hw[0] // d) * d, -(-hw[1] // d) * d


def plan_batches(
    items: Sequence[ImageItem], resize: Resize, batch_size: int, workers: int = 8
) -> list[list[int]]:
    """Batches of item indices; with shortest-side resizing, only images of one padded shape per batch.

    Padding changes the features of the border cells (the padded zeros turn into non-zero activations
    after the first conv+BN), so a batch holds only images whose sizes round up to the same multiple of 32:
    each image then gets exactly the padding it would get alone, and the stored features do not depend on
    batch_size, on the other images, or on where an interrupted run resumed. (The collate function checks
    this again on the decoded images, in case a header lied.)
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(resize, ResizeFixed):
        groups = [list(range(len(items)))]
    else:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            sizes = list(pool.map(_header_size, [it.path for it in items]))
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            # unreadable headers: one group (0, 0); the workers report those files
            shape = _padded(resize.output_size(h, w)) if h and w else (0, 0)
            by_shape.setdefault(shape, []).append(i)
        groups = [by_shape[k] for k in sorted(by_shape, key=lambda k: (k == (0, 0), -len(by_shape[k]), k))]
    return [g[k : k + batch_size] for g in groups for k in range(0, len(g), batch_size)]


# ---------------------------------------------------------------------------------------------------
# Decoding (DataLoader workers)


class ExtractionDataset(Dataset):
    """Decodes one image per item; an unreadable file becomes an item with an `error`.

    preprocess="workers": the item holds the resized, normalised float image. "device": only the decoded
    uint8 pixels and the size they resize to; `model_input` resizes and normalises them where the model runs.
    """

    def __init__(
        self, items: Sequence[ImageItem], pipeline: ImagePipeline, preprocess: str = "workers"
    ) -> None:
        if preprocess not in PREPROCESS:
            raise ConfigError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
        self.items = list(items)
        self.pipeline = pipeline
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from gridvqa.data.images import decode_rgb, load_image

        item = self.items[i]
        try:
            if self.preprocess == "device":
                pixels, info = self.pipeline.unresized(decode_rgb(item.path))
                nh, nw = info["size"]
                if min(nh, nw) <= 0:
                    raise ValueError(f"resize: output size must be positive, got {nh}x{nw}")
                return {"index": i, "pixels": pixels, "size": (nh, nw), "orig_size": info["orig_size"],
                        "scale": info["scale"], "error": None}
            x, _, info = self.pipeline(load_image(item.path))
        except ImageError as e:
            return {"index": i, "error": e.reason}
        except Exception as e:  # noqa: BLE001 - one image that cannot be prepared is skipped and listed
            return {"index": i, "error": f"cannot prepare the image ({type(e).__name__}: {e})"}
        return {"index": i, "image": x, "size": info["size"], "orig_size": info["orig_size"],
                "scale": info["scale"], "error": None}


def collate_extraction(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Unreadable images listed apart; readable ones in one group per padded shape: `images` (float,
    padded to a multiple of 32) or, for device preprocessing, what `collate_unresized` makes of the decoded
    images (`raw_pixels`, `resize_taps`, `pixel_mask`)."""
    out: dict[str, Any] = {"failed": [(b["index"], b["error"]) for b in batch if b["error"] is not None]}
    by_shape: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for b in batch:
        if b["error"] is None:
            by_shape.setdefault(_padded(tuple(b["size"])), []).append(b)
    out["groups"] = []
    for group in by_shape.values():
        g: dict[str, Any] = {
            "index": [b["index"] for b in group],
            "orig_size": [b["orig_size"] for b in group],
            "scale": [b["scale"] for b in group],
            "sizes": [tuple(int(v) for v in b["size"]) for b in group],
        }
        if "pixels" in group[0]:
            g.update(collate_unresized([b["pixels"] for b in group], g["sizes"],
                                       size_divisibility=SIZE_DIVISIBILITY))
        else:
            g["images"] = collate_images([b["image"] for b in group], size_divisibility=SIZE_DIVISIBILITY)[0]
        out["groups"].append(g)
    return out


def model_input(group: Mapping[str, Any], pipeline: ImagePipeline, device: torch.device) -> Tensor:
    """A collated group as the model's input batch on `device`: copied (non-blocking from pinned memory on
    a GPU) and, for device preprocessing, resized and normalised there as the pipeline would (the same
    bytes, the same floats), the whole group in one set of kernels."""

    def moved(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    if "raw_pixels" in group:
        taps = {k: moved(v) for k, v in group["resize_taps"].items()}
        images = resize_batch_uint8(moved(group["raw_pixels"]), taps)
        return normalize_batch(images, moved(group["pixel_mask"]), pipeline.normalization)
    return moved(group["images"])


def file_sha256(path: str | os.PathLike, n_hex: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]


def _plain(x: Any) -> Any:
    from gridvqa.config import to_plain

    return to_plain(x)


def _safetensors_config(path: Path) -> dict[str, Any] | None:
    """The `config` json that export_weights stores in the safetensors metadata (None if absent)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("config")
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None


def weights_file(cfg: Mapping[str, Any], kind: str) -> Path | None:
    """The file extraction loads its weights from (None: weights=random); see `resolve_weights`."""
    w = cfg.get("weights")
    if w == "random":
        return None
    p = Path(str(w if w is not None else cfg.get(f"{kind}_weights")))
    name = "backbone.safetensors" if kind == "grid" else "detector.safetensors"
    f = p / name if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"{f}: {kind} extraction weights not found; {_make_hint(p, kind)}")
    if kind == "region" and not p.is_dir():
        raise ConfigError(
            f"{p}: region extraction needs a folder from detector pre-training "
            f"(detector.safetensors + config.json); {_make_hint(p, kind)}"
        )
    return f


def _make_hint(p: Path, kind: str) -> str:
    make = TRAIN_COMMAND[kind]
    from gridvqa.config import conf_dir

    with contextlib.suppress(FileNotFoundError):
        if (Path(conf_dir()) / "experiment" / f"{p.name}.yaml").is_file():
            make = p.name
    return f"make them with `python -m gridvqa.train experiment={make}` (or pass weights=PATH | random)"


def resolve_weights(cfg: Mapping[str, Any], kind: str) -> WeightsSource:
    """`weights`: null (the kind's exported pre-training), `random`, a folder from export_weights, or (grid)
    a backbone .safetensors/.pth file. Missing weights: a ConfigError naming the command that makes them."""
    w = cfg.get("weights")
    if w == "random":
        return WeightsSource(None, f"random(seed={int(cfg.get('seed', 0))})")
    f = weights_file(cfg, kind)
    assert f is not None
    p = Path(str(w if w is not None else cfg.get(f"{kind}_weights")))
    if p.is_dir():
        conf_json = p / "config.json"
        config = load_json(conf_json, "exported detector config") if conf_json.is_file() else None
        if config is None:
            config = _safetensors_config(f) if f.suffix == ".safetensors" else None
        if not isinstance(config, dict) or "backbone" not in config:
            raise ConfigError(f"{conf_json}: exported config (backbone settings) not found beside {f}")
        return WeightsSource(f, file_sha256(f), config)
    config = _safetensors_config(p) if p.suffix == ".safetensors" else None
    return WeightsSource(p, file_sha256(p), config or {})


def build_extractor(cfg: Mapping[str, Any]) -> tuple[GridExtractor | RegionExtractor, dict[str, Any]]:
    """The model of `cfg.kind` and the provenance the feature file records for it."""
    kind = cfg["kind"]
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    src = resolve_weights(cfg, kind)
    model = build_grid_model(cfg, src) if kind == "grid" else build_region_model(cfg, src)
    return model, provenance(cfg, model, src)


def provenance(cfg: Mapping[str, Any], model: GridExtractor | RegionExtractor, src: WeightsSource) -> dict:
    """The settings that change the stored numbers (the writer refuses to mix files that differ in them)."""
    bb = model.backbone
    pipeline = build_pipeline(cfg, src.path)
    norm = pipeline.normalization
    prov: dict[str, Any] = {
        "backbone": bb.arch,
        "checkpoint": src.checkpoint,
        "resize": resize_text(pipeline.resize),
        "pixel_norm": norm.kind,
        "pixel_mean": list(norm.mean),
        "pixel_std": list(norm.std),
        "precision": str(cfg.get("precision", "float32")),
    }
    if isinstance(model, GridExtractor):
        prov["output_stride"] = model.stride
    else:
        det = model.detector
        rh = det.roi_heads
        prov.update(
            detector=type(det).__name__,
            proposals=int(det.config.rpn_post_nms_top_n_test),
            score_thresh=float(rh.score_thresh),
            nms_thresh=float(rh.nms_thresh),
            min_boxes=int(rh.min_boxes),
            max_boxes=int(rh.max_boxes),
            attr_topk=model.attr_topk if rh.attribute_predictor is not None else 0,
            labels="0-based object vocabulary index",
        )
    return prov


def prepare_model(
    model: GridExtractor | RegionExtractor,
    device: torch.device,
    channels_last: bool,
    *,
    compile: bool = False,
    cudnn_benchmark: bool = True,
    fold_bn: bool = True,
) -> nn.Module:
    """Move the model to `device`; the backbone's BNs folded into its convolutions (`fold_bn`), NHWC weights
    and inputs (`channels_last`), cuDNN's autotuner on a GPU (batches repeat a few padded shapes, so its
    per-shape search pays off), the backbone compiled."""
    model.to(device)
    if fold_bn:
        model.eval()
        model.backbone.fold_batch_norm()
    if channels_last:
        model.backbone.set_channels_last(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if compile:
        # the backbone only: the region heads' data-dependent box counts gain nothing from it. Padded
        # shapes vary with shortest-side resizing; dynamic shapes spare one compilation per shape.
        model.backbone.compile(dynamic=None)
    return model


# ---------------------------------------------------------------------------------------------------
# The loop


@dataclass
class ExtractionSummary:
    path: Path
    kind: str
    total: int  # images in the source
    done_before: int  # already in the file when the run started
    done_now: int = 0  # added by this run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), this run
    seconds: float = 0.0  # the extraction loop (decode + forward + write)
    nothing_to_do: bool = False
    note: str = ""
    headline: str = ""  # instead of the extraction figures (merge=only says what it merged)

    @property
    def images_per_s(self) -> float:
        return self.done_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def remaining(self) -> int:
        return self.total - self.done_before - self.done_now

    def line(self) -> str:
        if self.headline:
            return self.headline + (f"; {self.note}" if self.note else "")
        if self.nothing_to_do:
            text = f"{self.path}: nothing to do: {self.done_before} of {self.total} images already extracted"
            return text + (f"; {self.note}" if self.note else "")
        text = (
            f"{self.path}: {self.kind} features: {self.done_now} images done in {self.seconds:.1f} s "
            f"({self.images_per_s:.2f} images/s), {len(self.skipped)} skipped, "
            f"{self.done_before + self.done_now} of {self.total} in the file"
        )
        if self.remaining - len(self.skipped) > 0:
            text += f"; {self.remaining - len(self.skipped)} left (run the same command again to continue)"
        if self.skipped:
            text += f"; skipped: {'; '.join(f'{p} ({r})' for p, r in self.skipped[:3])}"
            text += f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return text + (f"; {self.note}" if self.note else "")


def _to_numpy(x: Tensor) -> Any:
    return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()


def grid_to_host(grid: Tensor, dtype: str) -> np.ndarray:
    """A grid map as the writer stores it, cast to float16 where it was computed.

    On a GPU this halves the device->host copy and spares the host a float16 conversion of every map
    (numpy on one core: ~4 ms for a 19x32x2048 map, ~27 ms at stride 16); the bits are the same (both
    round to nearest even). A map that would overflow float16 goes over as float32, so the writer
    refuses it with its own error.
    """
    if dtype == "float16":
        half = grid.detach().to(torch.float16).contiguous()
        if not bool(torch.isinf(half).any()):
            return half.cpu().numpy()
    return _to_numpy(grid)


def grids_to_host(grids: Sequence[Tensor], dtype: str) -> list[np.ndarray]:
    """`grid_to_host` of every map of a batch, on a GPU with one device->host copy (one wait for the
    device) instead of one per map; the same bits."""
    return HostGrids(grids, dtype).wait()


class HostGrids:
    """A batch's grid maps on their way to the host. On a GPU the float16 cast and one copy into pinned
    memory are queued on the device's stream and `wait` waits for them alone, so the next batch's forward
    can be queued before this batch is handed to the writer (the device is not left idle meanwhile).
    The maps handed on stay in that pinned memory until the writer commits them (`commit_images` of them
    at most: 256 x 2.5 MB at stride 32)."""

    def __init__(self, grids: Sequence[Tensor], dtype: str) -> None:
        self._ready: list[np.ndarray] | None = None
        if dtype != "float16" or not grids or grids[0].device.type == "cpu":
            self._ready = [grid_to_host(g, dtype) for g in grids]
            return
        self._grids = list(grids)
        halves = [g.detach().to(torch.float16) for g in grids]
        self._shapes = [h.shape for h in halves]
        flat = torch.cat([h.reshape(-1) for h in halves])
        self._flat = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        self._flat.copy_(flat, non_blocking=True)
        overflow = torch.stack([torch.isinf(h).any() for h in halves])
        self._overflow = torch.empty(overflow.shape, dtype=torch.bool, pin_memory=True)
        self._overflow.copy_(overflow, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> list[np.ndarray]:
        if self._ready is None:
            self._event.synchronize()
            out, offset = [], 0
            for g, shape, bad in zip(self._grids, self._shapes, self._overflow.tolist(), strict=True):
                n = int(np.prod(shape))
                out.append(_to_numpy(g) if bad else self._flat[offset : offset + n].view(shape).numpy())
                offset += n
            self._ready, self._grids = out, []
        return self._ready


def _write_region(
    writer: FeatureWriter, image_id: int, out: Any, orig_size: tuple[int, int], scale: tuple[float, float]
) -> None:
    h, w = orig_size
    sy, sx = scale
    # detections are in resized-image pixels: undo the resize, clip to the original image
    boxes = out["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    writer.add_region(
        image_id,
        _to_numpy(out["features"]),
        boxes.numpy(),
        orig_size,
        labels=_to_numpy(out["labels"]),
        scores=_to_numpy(out["scores"]),
        attr_labels=_to_numpy(out["attr_labels"]) if "attr_labels" in out else None,
        attr_scores=_to_numpy(out["attr_scores"]) if "attr_scores" in out else None,
    )


def resolve_preprocess(preprocess: str, device: torch.device) -> str:
    """`auto`: resize and normalise on a GPU when extracting on one (the workers then only decode, and
    uint8 pixels cross to it instead of float32 ones), else in the loader workers."""
    if preprocess == "auto":
        return "device" if device.type == "cuda" else "workers"
    if preprocess not in PREPROCESS:
        raise ConfigError(f"preprocess must be auto or one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    return preprocess


def extraction_loader(
    items: Sequence[ImageItem],
    pipeline: ImagePipeline,
    batches: Sequence[Sequence[int]],
    num_workers: int,
    device: torch.device,
    preprocess: str = "workers",
) -> DataLoader:
    """The DataLoader `extract` decodes with (public so the benchmark times the very same one); batches are
    pinned on a GPU, so `model_input`'s copies do not wait for the host."""
    return DataLoader(
        ExtractionDataset(items, pipeline, resolve_preprocess(preprocess, device)),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_extraction,
        pin_memory=device.type == "cuda",
    )


def _planned_batches(
    items: Sequence[ImageItem],
    done: set[int],
    pipeline: ImagePipeline,
    batch_size: int,
    max_images: int | None,
) -> list[list[int]]:
    todo_idx = [i for i, it in enumerate(items) if it.image_id not in done]
    plan = plan_batches([items[i] for i in todo_idx], pipeline.resize, batch_size)
    batches = [[todo_idx[j] for j in b] for b in plan]
    if max_images is not None:
        counts = np.cumsum([0] + [len(b) for b in batches])
        batches = batches[: int(np.searchsorted(counts, max_images))]
    return batches


def extract(
    items: Sequence[ImageItem],
    model: GridExtractor | RegionExtractor,
    pipeline: ImagePipeline,
    writer: FeatureWriter,
    *,
    batch_size: int = 8,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "float32",
    preprocess: str = "auto",
    max_images: int | None = None,
    commit_images: int = 256,
    progress: bool = True,
    on_batch: Any = None,
    summary: ExtractionSummary | None = None,
) -> ExtractionSummary:
    """Extract the images of `items` not yet in `writer`; the writer is left open (the caller closes it).

    `preprocess`: where images are resized and normalised (see `resolve_preprocess`); the stored numbers
    are the same either way. `max_images` stops after the batch that reaches that many new images.
    `on_batch(n)` is called after each batch (benchmarks, tests). Pass `summary` to see what was done even
    when the loop raises.
    """
    from tqdm import tqdm

    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    done = writer.done_ids
    before = len(done & {it.image_id for it in items})
    if summary is None:
        summary = ExtractionSummary(writer.path, model.kind, len(items), before)
    summary.done_before = before
    batches = _planned_batches(items, done, pipeline, batch_size, max_images)
    if not batches:
        summary.nothing_to_do = True
        return summary
    loader = extraction_loader(items, pipeline, batches, num_workers, device, preprocess)
    dtype = PRECISIONS[precision]
    # bfloat16: convolutions and matmuls run in bfloat16 under autocast (reductions stay float32)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    step = _BatchStep(items, model, pipeline, writer, device, autocast, summary)
    since_commit = 0
    start = time.perf_counter()
    try:
        with (
            tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"{model.kind} features",
                 disable=not progress, dynamic_ncols=True) as bar,
            torch.inference_mode(),
        ):
            for batch in _and_then_none(loader):
                new, failed = _run_batch(batch, step)
                summary.done_now += new
                since_commit += new
                if since_commit >= commit_images:
                    writer.flush(wait=False)  # a background writer commits while the next batch runs
                    since_commit = 0
                bar.update(new + failed)
                if summary.skipped:
                    bar.set_postfix(skipped=len(summary.skipped))
                if on_batch is not None:
                    on_batch(new)
        writer.flush()
    finally:
        summary.seconds = time.perf_counter() - start
    return summary


def _and_then_none(loader: Any) -> Iterator[dict[str, Any] | None]:
    # one more step after the last batch: it hands that batch over
    yield from loader
    yield None


@dataclass
class _BatchStep:
    """What every batch of one `extract` call needs, and the batch queued on the device before this one."""

    items: Sequence[ImageItem]
    model: nn.Module
    pipeline: ImagePipeline
    writer: FeatureWriter
    device: torch.device
    autocast: Any
    summary: ExtractionSummary
    pending: tuple[dict[str, Any], list[tuple[Mapping[str, Any], Any]]] | None = None


def _run_batch(batch: dict[str, Any] | None, step: _BatchStep) -> tuple[int, int]:
    """Queue one batch's forward on the device, then hand the batch before it to the writer (its maps
    reach the host while this one computes); None hands over the last one. Returns (new images, failed
    images) of the batch handed over."""
    launched = (batch, _launch(batch, step)) if batch is not None else None
    handed = _hand_over(*step.pending, step) if step.pending is not None else (0, 0)
    step.pending = launched
    return handed


def _launch(batch: dict[str, Any], step: _BatchStep) -> list[tuple[Mapping[str, Any], Any]]:
    launched = []
    for group in batch["groups"]:
        x = model_input(group, step.pipeline, step.device)
        with step.autocast:
            outs = step.model(x, group["sizes"])
        if isinstance(step.model, GridExtractor):
            outs = HostGrids(outs, step.writer.dtype)
        launched.append((group, outs))
    return launched


def _hand_over(
    batch: dict[str, Any], launched: list[tuple[Mapping[str, Any], Any]], step: _BatchStep
) -> tuple[int, int]:
    items, writer, summary = step.items, step.writer, step.summary
    done = writer.done_ids
    for i, reason in batch["failed"]:
        it = items[i]
        if it.image_id not in done:
            log.warning("skipping image %d: %s: %s", it.image_id, it.path, reason)
            summary.skipped.append((str(it.path), reason))
    new = 0
    for group, outs in launched:
        if isinstance(outs, HostGrids):
            outs = outs.wait()
        for i, out, size, scale in zip(group["index"], outs, group["orig_size"], group["scale"], strict=True):
            it = items[i]
            if it.image_id in done:
                continue
            if isinstance(out, dict) and out["features"].shape[0] == 0:
                # the store cannot hold an image without rows; min_boxes > 0 avoids this
                log.warning("skipping image %d: %s: the detector kept no box", it.image_id, it.path)
                summary.skipped.append((str(it.path), "the detector kept no box"))
                continue
            if isinstance(out, np.ndarray):
                writer.add_grid(it.image_id, out, size)
            else:
                _write_region(writer, it.image_id, out, size, scale)
            new += 1
    return new, len(batch["failed"])


# ---------------------------------------------------------------------------------------------------
# Skipped-image list beside the output


def skipped_path(output: Path) -> Path:
    return output.with_name(output.name + ".skipped.json")


def _signature(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_skipped(path: Path) -> dict[int, dict[str, Any]]:
    if not path.is_file():
        return {}
    data = load_json(path, "list of skipped images")
    try:
        return {int(e["image_id"]): e for e in data["skipped"]}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: not a list of skipped images (delete it to start afresh)") from None


def _write_skipped(path: Path, entries: dict[int, dict[str, Any]]) -> None:
    if entries:
        atomic_write_json(path, {"skipped": [entries[k] for k in sorted(entries)]}, indent=1)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Entry point


def source_items(cfg: Mapping[str, Any]) -> list[ImageItem]:
    if cfg.get("images_dir"):
        out = Path(str(cfg["output"]))
        id_map = cfg.get("id_map") or out.with_name(out.name + ".ids.json")
        return folder_images(str(cfg["images_dir"]), str(id_map))
    return split_images(str(cfg["paths"]["data_root"]), str(cfg["split"]))


_FROM_CFG = Path("/")  # sentinel: find the weights file from cfg


def build_pipeline(cfg: Mapping[str, Any], weights: Path | None = _FROM_CFG) -> ImagePipeline:
    """The extraction image pipeline: cfg's resize rule, and the pixel normalisation recorded in the weights
    the images feed (`weights`, by default the file `cfg` names; None: random weights, nothing recorded)."""
    spec = ImageSpec.from_mapping({k: _plain(cfg.get(k)) for k in ("image_size", "short", "max_size", "norm",
                                                                    "pixel_mean", "pixel_std")})
    if isinstance(spec.short, tuple):  # no random choice at test time
        raise ConfigError(f"short={list(spec.short)}: extraction needs one shorter side")
    if weights is _FROM_CFG:
        weights = weights_file(cfg, str(cfg["kind"])) if cfg.get("kind") in KINDS else None
    return ImagePipeline.from_spec(resolve_image_spec(spec, weights))


@contextlib.contextmanager
def _cli_overwrite_hint() -> Iterator[None]:
    try:
        yield
    except DataError as e:
        msg = str(e).replace("pass overwrite=True", "pass overwrite=true")
        raise DataError(msg) from None


def extraction_device(cfg: Mapping[str, Any]) -> torch.device:
    """`device`; under torchrun, device=auto gives each process its own GPU (LOCAL_RANK)."""
    name = cfg.get("device", "auto")
    local = os.environ.get("LOCAL_RANK")
    if name in (None, "auto") and local and torch.cuda.is_available():
        device = torch.device("cuda", int(local) % torch.cuda.device_count())
    else:
        device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # pinned batches and kernels go to this process's GPU
    return device


def run(cfg: Mapping[str, Any]) -> ExtractionSummary:
    """The whole `python -m gridvqa.extract` run; returns its summary (the caller prints `summary.line()`).

    With shards=N (or under torchrun) this process extracts its shard into its part file, and with
    merge=auto the process of shard 0 merges the parts once all are complete (gridvqa.extraction_shards).
    """
    from gridvqa import extraction_shards as sh

    kind = cfg["kind"]
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    output = Path(str(cfg["output"]))
    plan = sh.shard_plan(cfg, output)
    pipeline = build_pipeline(cfg)
    items = source_items(cfg)
    keep = bool(cfg.get("keep_shards", False))
    if plan.merge == "only":
        done = sh.merge_only(plan, items, keep)
        return ExtractionSummary(output, kind, len(items), len(sh.file_ids(output)), headline=done)
    device = extraction_device(cfg)
    model, prov = build_extractor(cfg)
    if not plan.active:
        return _extract_file(cfg, output, items, model, prov, pipeline, device)
    already = sh.file_ids(output)
    mine = [it for it in plan.items(items) if it.image_id not in already]
    summary = _extract_file(cfg, plan.part(), mine, model, prov, pipeline, device)
    if plan.shard == 0 and plan.merge == "auto":
        note = sh.merge_when_complete(plan, items, already, wait_s=float(cfg.get("merge_wait", 600)),
                                      keep_shards=keep)
        summary.note = "; ".join(n for n in (summary.note, note) if n)
    return summary


def _open_writer(cfg: Mapping[str, Any], output: Path, kind: str, prov: dict[str, Any]) -> FeatureWriter:
    with _cli_overwrite_hint():
        return FeatureWriter(
            output,
            kind,
            prov,
            dtype=str(cfg.get("dtype", "float16")),
            overwrite=bool(cfg.get("overwrite", False)),
            background=bool(cfg.get("writer_thread", True)),
        )


def _extract_file(
    cfg: Mapping[str, Any],
    output: Path,
    items: Sequence[ImageItem],
    model: GridExtractor | RegionExtractor,
    prov: dict[str, Any],
    pipeline: ImagePipeline,
    device: torch.device,
) -> ExtractionSummary:
    """Extract `items` into `output` (resuming it), keeping `<output>.skipped.json` up to date."""
    kind = model.kind
    writer = _open_writer(cfg, output, kind, prov)
    skip_file = skipped_path(output)
    with writer:
        old_skipped = {} if cfg.get("overwrite") else _read_skipped(skip_file)
        missing = writer.missing(it.image_id for it in items)
        unchanged = {
            it.image_id
            for it in items
            if it.image_id in old_skipped and old_skipped[it.image_id].get("signature") == _signature(it.path)
        }
        if not missing or set(missing) <= unchanged:
            done = len(items) - len(missing)
            note = (
                f"{len(missing)} unreadable image(s) listed in {skip_file} have not changed since"
                if missing
                else ""
            )
            return ExtractionSummary(output, kind, len(items), done, nothing_to_do=True, note=note)
        log.info(
            "%s: extracting %d of %d images (%s) on %s",
            output,
            len(missing),
            len(items),
            ", ".join(f"{k}={v}" for k, v in prov.items()),
            device,
        )
        prepare_model(
            model,
            device,
            bool(cfg.get("channels_last", True)),
            compile=bool(cfg.get("compile", False)),
            cudnn_benchmark=bool(cfg.get("cudnn_benchmark", True)),
            fold_bn=bool(cfg.get("fold_bn", True)),
        )
        summary = ExtractionSummary(output, kind, len(items), len(items) - len(missing))
        try:
            extract(
                items,
                model,
                pipeline,
                writer,
                batch_size=int(cfg.get("batch_size", 8)),
                num_workers=int(cfg.get("num_workers", 2)),
                device=device,
                precision=str(cfg.get("precision", "float32")),
                preprocess=str(cfg.get("preprocess", "auto")),
                max_images=cfg.get("max_images"),
                commit_images=int(cfg.get("commit_images", 256)),
                progress=bool(cfg.get("progress", True)),
                summary=summary,
            )
        finally:
            _update_skipped(skip_file, items, old_skipped, writer.done_ids, summary.skipped)
    if summary.skipped:
        summary.note = f"unreadable images listed in {skip_file}"
    return summary


def _update_skipped(
    skip_file: Path,
    items: Sequence[ImageItem],
    old: dict[int, dict[str, Any]],
    done: set[int],
    skipped: Sequence[tuple[str, str]],
) -> None:
    by_path = {str(it.path): it for it in items}
    entries = {k: v for k, v in old.items() if k not in done}
    for p, reason in skipped:
        it = by_path[p]
        entries[it.image_id] = {
            "image_id": it.image_id,
            "path": p,
            "reason": reason,
            "signature": _signature(it.path),
        }
    _write_skipped(skip_file, entries)
