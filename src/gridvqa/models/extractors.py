"""The models feature extraction runs: the grid extractor (a backbone's res5 map) and the region extractor
(a bottom-up detector's kept boxes), and how they are built from a config and the weights that feed them.

Where the weights come from (exported pre-training folders, bare backbone files, random init) is decided by
gridvqa.extraction.resolve_weights; the builders here take its answer (`WeightsSource`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gridvqa.errors import ConfigError


@dataclass
class WeightsSource:
    """Where extraction weights come from: None path = random init (weights=random)."""

    path: Path | None
    checkpoint: str  # sha256 (first 16 hex) of the loaded file, or "random(seed=N)"
    config: dict[str, Any] = field(default_factory=dict)  # export config (kind, backbone, detector, ...)


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


def _plain(x: Any) -> Any:
    from gridvqa.config import to_plain

    return to_plain(x)


def _backbone_kwargs(saved: Mapping[str, Any] | None, fallback: Mapping[str, Any]) -> dict[str, Any]:
    bb = dict(_plain(saved) if saved else _plain(fallback))
    # weights are loaded below; training-only switches off; channels_last set by the caller
    bb.update(weights=None, freeze_at=0, grad_checkpointing=False, channels_last=False)
    return bb


def build_grid_model(cfg: Mapping[str, Any], src: WeightsSource) -> GridExtractor:
    """The grid extractor of an extraction config (`backbone`, `res5_dilation`, `seed`), `src`'s weights."""
    from gridvqa.models.backbone import build_backbone

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
    return GridExtractor(backbone).eval()


def _region_parts(cfg: Mapping[str, Any], src: WeightsSource) -> tuple[str, dict, dict, int, int]:
    """(detector kind, backbone kwargs, detector kwargs, classes, attributes) from the exported config, or
    from `cfg` for random weights."""
    rc = dict(_plain(cfg["region"]))
    if src.path is None:
        bb_cfg = _backbone_kwargs(None, cfg["backbone"])
        bb_cfg.update(out_features=["res4"], res5_dilation=1)
        return "c4", bb_cfg, dict(rc.get("detector") or {}), int(rc["num_classes"]), int(rc["num_attributes"])
    saved = src.config
    try:
        num_classes, num_attributes = int(saved["num_classes"]), int(saved.get("num_attributes", 0))
    except (KeyError, TypeError, ValueError):
        where = src.path.parent / "config.json"
        raise ConfigError(f"{where}: no num_classes in the exported config") from None
    bb_cfg = _backbone_kwargs(saved["backbone"], cfg["backbone"])
    det_cfg = dict(saved.get("detector") or {})
    return str(saved.get("kind", "c4")), bb_cfg, det_cfg, num_classes, num_attributes


def _load_detector(detector: nn.Module, path: Path) -> None:
    from gridvqa.models.safe_load import load_state_dict_file

    sd = load_state_dict_file(path)
    own = detector.state_dict()
    bad = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"{path}: weight {k} has shape {tuple(sd[k].shape)}, the detector built "
            f"from config.json expects {tuple(own[k].shape)}"
        )
    result = detector.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} detector weights missing (e.g. {missing[0]})")


def build_region_model(cfg: Mapping[str, Any], src: WeightsSource) -> RegionExtractor:
    """The region extractor of an extraction config (`region` test-time settings) with `src`'s detector."""
    from gridvqa.models.backbone import build_backbone
    from gridvqa.models.detector import build_detector

    rc = dict(_plain(cfg["region"]))
    det_kind, bb_cfg, det_cfg, num_classes, num_attributes = _region_parts(cfg, src)
    det_cfg.update(
        rpn_post_nms_top_n_test=int(rc["proposals"]),
        score_thresh=float(rc["score_thresh"]),
        nms_thresh=float(rc["nms_thresh"]),
        min_boxes=int(rc["min_boxes"]),
        max_boxes=int(rc["max_boxes"]),
    )
    if src.path is None:
        torch.manual_seed(int(cfg.get("seed", 0)))
    backbone = build_backbone(**bb_cfg)
    detector = build_detector(det_kind, backbone, num_classes, num_attributes, **det_cfg)
    if src.path is not None:
        _load_detector(detector, src.path)
    backbone.freeze(5)
    return RegionExtractor(detector, int(rc.get("attr_topk", 1))).eval()
