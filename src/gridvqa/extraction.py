"""Feature extraction to HDF5: grid (res5 map) or region (bottom-up C4 boxes) features of a split's images.

`run(cfg)` is the body of `python -m gridvqa.extract` (config: conf/extract.yaml). The pieces are public so
scripts (scripts/bench_extraction.py) and tests can drive them directly:

    items = split_images(data_root, "val")              # or folder_images(DIR, id_map_path)
    model, provenance = build_extractor(cfg)              # GridExtractor | RegionExtractor (+ what made it)
    summary = extract(items, model, pipeline, writer, ...)

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
import math
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
    resize_text,
    resolve_image_spec,
)
from gridvqa.data.jsonio import atomic_write_json, load_json
from gridvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("grid", "region")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
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
    """Decodes and resizes one image per item; an unreadable file becomes an item with an `error`."""

    def __init__(self, items: Sequence[ImageItem], pipeline: ImagePipeline) -> None:
        self.items = list(items)
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from gridvqa.data.images import load_image

        item = self.items[i]
        try:
            img = load_image(item.path)
            x, _, info = self.pipeline(img)
        except ImageError as e:
            return {"index": i, "error": e.reason}
        except Exception as e:  # noqa: BLE001 - one image that cannot be prepared is skipped and listed
            return {"index": i, "error": f"cannot prepare the image ({type(e).__name__}: {e})"}
        return {"index": i, "image": x, "orig_size": info["orig_size"], "scale": info["scale"], "error": None}


def collate_extraction(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Unreadable images listed apart; readable ones padded into one tensor per padded shape."""
    out: dict[str, Any] = {"failed": [(b["index"], b["error"]) for b in batch if b["error"] is not None]}
    by_shape: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for b in batch:
        if b["error"] is None:
            by_shape.setdefault(_padded(tuple(b["image"].shape[-2:])), []).append(b)
    out["groups"] = []
    for group in by_shape.values():
        images, _, sizes = collate_images([b["image"] for b in group], size_divisibility=SIZE_DIVISIBILITY)
        out["groups"].append(
            {
                "index": [b["index"] for b in group],
                "orig_size": [b["orig_size"] for b in group],
                "scale": [b["scale"] for b in group],
                "images": images,
                "sizes": [tuple(int(v) for v in s) for s in sizes.tolist()],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Models


class GridExtractor(nn.Module):
    """The backbone's res5 map of each image, only the cells that see real pixels: ceil(h/s) x ceil(w/s)."""

    kind = "grid"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def stride(self) -> int:
        return int(self.backbone.output_shape()["res5"].stride)

    def forward(self, images: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        feats = self.backbone(images)["res5"]
        s = self.stride
        return [
            feats[i, :, : math.ceil(h / s), : math.ceil(w / s)].permute(1, 2, 0)
            for i, (h, w) in enumerate(sizes)
        ]


class RegionExtractor(nn.Module):
    """A detector in eval mode; per image the kept boxes with their region vectors and predictions."""

    kind = "region"

    def __init__(self, detector: nn.Module, attr_topk: int = 1) -> None:
        super().__init__()
        self.detector = detector
        self.attr_topk = int(attr_topk)

    @property
    def backbone(self) -> nn.Module:
        return self.detector.backbone

    def forward(self, images: Tensor, sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        out = []
        for det in self.detector(images, sizes):
            res = {
                "features": det["features"],
                "boxes": det["boxes"],
                "scores": det["scores"],
                "labels": det["labels"] - 1,
            }  # 0-based index into the objects vocabulary
            attr = det.get("attr_scores")
            if attr is not None and self.attr_topk > 0:
                top = attr.float().topk(min(self.attr_topk, attr.shape[1]), dim=1)
                squeeze = self.attr_topk == 1
                res["attr_scores"] = top.values[:, 0] if squeeze else top.values
                res["attr_labels"] = top.indices[:, 0] if squeeze else top.indices
            out.append(res)
        return out


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


@dataclass
class WeightsSource:
    """Where extraction weights come from: None path = random init (weights=random)."""

    path: Path | None
    checkpoint: str  # sha256 (first 16 hex) of the loaded file, or "random(seed=N)"
    config: dict[str, Any] = field(default_factory=dict)  # export config (kind, backbone, detector, ...)


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


def _backbone_kwargs(saved: Mapping[str, Any] | None, fallback: Mapping[str, Any]) -> dict[str, Any]:
    bb = dict(_plain(saved) if saved else _plain(fallback))
    # weights are loaded below; training-only switches off; channels_last set by the caller
    bb.update(weights=None, freeze_at=0, grad_checkpointing=False, channels_last=False)
    return bb


def build_grid_model(cfg: Mapping[str, Any]) -> tuple[GridExtractor, WeightsSource]:
    from gridvqa.models.backbone import build_backbone

    src = resolve_weights(cfg, "grid")
    bb_cfg = _backbone_kwargs(src.config.get("backbone"), cfg["backbone"])
    # the paper's res5 map at output stride 32: pre-training's dilation removed on the same weights
    # (res5_dilation=2 keeps it, stride 16: the CPU configs' small images then still give a 12x12 grid)
    dilation = int(cfg.get("res5_dilation", 1))
    if dilation not in (1, 2):
        raise ConfigError(f"extract: res5_dilation must be 1 (output stride 32) or 2 (16), got {dilation}")
    bb_cfg.update(out_features=["res5"], res5_dilation=dilation)
    if src.path is None:
        torch.manual_seed(int(cfg.get("seed", 0)))
    backbone = build_backbone(**bb_cfg)
    if src.path is not None:
        backbone.load_weights(src.path)
    backbone.freeze(5)  # all of it, BN turned FrozenBN with the learned statistics
    backbone.set_res5_dilation(dilation)
    return GridExtractor(backbone).eval(), src


def build_region_model(cfg: Mapping[str, Any]) -> tuple[RegionExtractor, WeightsSource]:
    from gridvqa.models.backbone import build_backbone
    from gridvqa.models.detector import build_detector
    from gridvqa.models.safe_load import load_state_dict_file

    src = resolve_weights(cfg, "region")
    rc = dict(_plain(cfg["region"]))
    test_time = dict(
        rpn_post_nms_top_n_test=int(rc["proposals"]),
        score_thresh=float(rc["score_thresh"]),
        nms_thresh=float(rc["nms_thresh"]),
        min_boxes=int(rc["min_boxes"]),
        max_boxes=int(rc["max_boxes"]),
    )
    if src.path is None:
        det_kind = "c4"
        bb_cfg = _backbone_kwargs(None, cfg["backbone"])
        bb_cfg.update(out_features=["res4"], res5_dilation=1)
        det_cfg = dict(rc.get("detector") or {})
        num_classes, num_attributes = int(rc["num_classes"]), int(rc["num_attributes"])
        torch.manual_seed(int(cfg.get("seed", 0)))
    else:
        saved = src.config
        det_kind = str(saved.get("kind", "c4"))
        bb_cfg = _backbone_kwargs(saved["backbone"], cfg["backbone"])
        det_cfg = dict(saved.get("detector") or {})
        try:
            num_classes, num_attributes = int(saved["num_classes"]), int(saved.get("num_attributes", 0))
        except (KeyError, TypeError, ValueError):
            where = src.path.parent / "config.json"
            raise ConfigError(f"{where}: no num_classes in the exported config") from None
    det_cfg.update(test_time)
    backbone = build_backbone(**bb_cfg)
    detector = build_detector(det_kind, backbone, num_classes, num_attributes, **det_cfg)
    if src.path is not None:
        sd = load_state_dict_file(src.path)
        own = detector.state_dict()
        bad = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
        if bad:
            k = bad[0]
            raise ConfigError(
                f"{src.path}: weight {k} has shape {tuple(sd[k].shape)}, the detector built "
                f"from config.json expects {tuple(own[k].shape)}"
            )
        result = detector.load_state_dict(sd, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing:
            raise ConfigError(f"{src.path}: {len(missing)} detector weights missing (e.g. {missing[0]})")
    backbone.freeze(5)
    return RegionExtractor(detector, int(rc.get("attr_topk", 1))).eval(), src


def build_extractor(cfg: Mapping[str, Any]) -> tuple[GridExtractor | RegionExtractor, dict[str, Any]]:
    """The model of `cfg.kind` and the provenance the feature file records for it."""
    kind = cfg["kind"]
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    model, src = build_grid_model(cfg) if kind == "grid" else build_region_model(cfg)
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


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available (use device=auto or cpu)")
    return dev


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.backbone.set_channels_last(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
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

    @property
    def images_per_s(self) -> float:
        return self.done_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def remaining(self) -> int:
        return self.total - self.done_before - self.done_now

    def line(self) -> str:
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


def _write(
    writer: FeatureWriter, image_id: int, out: Any, orig_size: tuple[int, int], scale: tuple[float, float]
) -> None:
    if isinstance(out, Tensor):
        writer.add_grid(image_id, grid_to_host(out, writer.dtype), orig_size)
        return
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


def extraction_loader(
    items: Sequence[ImageItem],
    pipeline: ImagePipeline,
    batches: Sequence[Sequence[int]],
    num_workers: int,
    device: torch.device,
) -> DataLoader:
    """The DataLoader `extract` decodes with (public so the benchmark times the very same one)."""
    return DataLoader(
        ExtractionDataset(items, pipeline),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_extraction,
        pin_memory=device.type == "cuda",
    )


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
    max_images: int | None = None,
    commit_images: int = 256,
    progress: bool = True,
    on_batch: Any = None,
    summary: ExtractionSummary | None = None,
) -> ExtractionSummary:
    """Extract the images of `items` not yet in `writer`; the writer is left open (the caller closes it).

    `max_images` stops after the batch that reaches that many new images. `on_batch(n)` is called after each
    batch (benchmarks, tests). Pass `summary` to see what was done even when the loop raises.
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
    todo_idx = [i for i, it in enumerate(items) if it.image_id not in done]
    plan = plan_batches([items[i] for i in todo_idx], pipeline.resize, batch_size)
    batches = [[todo_idx[j] for j in b] for b in plan]
    if max_images is not None:
        counts = np.cumsum([0] + [len(b) for b in batches])
        batches = batches[: int(np.searchsorted(counts, max_images))]
    todo = sum(len(b) for b in batches)
    if not batches:
        summary.nothing_to_do = True
        return summary
    loader = extraction_loader(items, pipeline, batches, num_workers, device)
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    since_commit = 0
    start = time.perf_counter()
    try:
        with (
            tqdm(
                total=todo,
                unit="img",
                desc=f"{model.kind} features",
                disable=not progress,
                dynamic_ncols=True,
            ) as bar,
            torch.inference_mode(),
        ):
            for batch in loader:
                new = _run_batch(batch, items, model, writer, device, autocast, summary)
                summary.done_now += new
                since_commit += new
                if since_commit >= commit_images:
                    writer.flush()
                    since_commit = 0
                bar.update(new + len(batch["failed"]))
                if summary.skipped:
                    bar.set_postfix(skipped=len(summary.skipped))
                if on_batch is not None:
                    on_batch(new)
        writer.flush()
    finally:
        summary.seconds = time.perf_counter() - start
    return summary


def _run_batch(
    batch: dict[str, Any],
    items: Sequence[ImageItem],
    model: nn.Module,
    writer: FeatureWriter,
    device: torch.device,
    autocast: Any,
    summary: ExtractionSummary,
) -> int:
    """Forward one batch and hand its images to the writer; returns how many were new."""
    done = writer.done_ids
    for i, reason in batch["failed"]:
        it = items[i]
        if it.image_id not in done:
            log.warning("skipping image %d: %s: %s", it.image_id, it.path, reason)
            summary.skipped.append((str(it.path), reason))
    new = 0
    for group in batch["groups"]:
        with autocast:
            outs = model(group["images"].to(device, non_blocking=True), group["sizes"])
        for i, out, size, scale in zip(group["index"], outs, group["orig_size"], group["scale"], strict=True):
            it = items[i]
            if it.image_id in done:
                continue
            if isinstance(out, dict) and out["features"].shape[0] == 0:
                # the store cannot hold an image without rows; min_boxes > 0 avoids this
                log.warning("skipping image %d: %s: the detector kept no box", it.image_id, it.path)
                summary.skipped.append((str(it.path), "the detector kept no box"))
                continue
            _write(writer, it.image_id, out, size, scale)
            new += 1
    return new


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


def run(cfg: Mapping[str, Any]) -> ExtractionSummary:
    """The whole `python -m gridvqa.extract` run; returns its summary (the caller prints `summary.line()`)."""
    kind = cfg["kind"]
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    output = Path(str(cfg["output"]))
    pipeline = build_pipeline(cfg)
    items = source_items(cfg)
    device = resolve_device(cfg.get("device", "auto"))
    model, prov = build_extractor(cfg)
    with _cli_overwrite_hint():
        writer = FeatureWriter(
            output,
            kind,
            prov,
            dtype=str(cfg.get("dtype", "float16")),
            overwrite=bool(cfg.get("overwrite", False)),
        )
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
        prepare_model(model, device, bool(cfg.get("channels_last", True)))
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
                max_images=cfg.get("max_images"),
                commit_images=int(cfg.get("commit_images", 256)),
                progress=bool(cfg.get("progress", True)),
                summary=summary,
            )
        finally:
            by_path = {str(it.path): it for it in items}
            entries = {k: v for k, v in old_skipped.items() if k not in writer.done_ids}
            for p, reason in summary.skipped:
                it = by_path[p]
                entries[it.image_id] = {
                    "image_id": it.image_id,
                    "path": p,
                    "reason": reason,
                    "signature": _signature(it.path),
                }
            _write_skipped(skip_file, entries)
    if summary.skipped:
        summary.note = f"unreadable images listed in {skip_file}"
    return summary
