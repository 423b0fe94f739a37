"""Visual Genome detectors: the grid-feats-vqa 1x1-RoI detector and the bottom-up (updn) C4 detector.

Both take images already normalised and padded by our data pipeline (no torchvision GeneralizedRCNNTransform),
and the per-image (h, w) of the unpadded content. Classes follow torchvision: 0 = background, 1..num_classes.

    GridDetector  RPN on (dilated) res5 -> 1x1 RoIAlign on res5 -> fc1, fc2 (1024) -> classes/boxes/attributes
    C4Detector    RPN on res4 -> 14x14 RoIAlign on res4 -> backbone.res5 per region -> mean -> same predictors

Training returns loss_rpn_cls, loss_rpn_box, loss_cls, loss_box_reg and loss_attr (with attributes); eval
returns per image boxes / scores / labels / features (the region vector of each kept box) / proposal_boxes
(the region those features were pooled from) / attr_scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from gridvqa.errors import ConfigError
from gridvqa.models.roi_heads import POOLERS, FCBoxHead, RoIHeads, RoISamples, pool_regions
from gridvqa.models.rpn import build_rpn

KINDS = ("grid", "c4")


@dataclass
class DetectorConfig:
    """Every detector setting; defaults are the grid-feats-vqa / bottom-up recipe at 600x1000 input.

    `None` means "the detector kind's default": pooler_resolution 1 (grid) / 14 (c4); sampling_ratio 2 (grid,
    Base-RCNN-grid) / 0 = adaptive (c4, detectron2 default); smooth_l1_beta 1.0 (grid) / 0.0 = L1 (c4,
    detectron2 default). grid-feats-vqa's Base-RCNN-updn sets 2 and 1.0 for C4 (pretrain_vg_c4_paper does).
    """

    # RPN
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 12000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    # Base-RCNN-grid uses 0 (ignore anchors crossing the border); -1 (off) suits small images, where most
    # large anchors cross it. Set 0 to match the reference exactly.
    rpn_boundary_thresh: float = -1.0
    # RoI pooling and heads
    pooler: str = "roi_align"
    pooler_resolution: int | None = None
    sampling_ratio: int | None = None
    fc_dim: int = 1024
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float | None = None
    attr_embed_dim: int = 256
    attr_fc_dim: int = 512
    attr_loss_weight: float = 0.2
    # Inference (bottom-up: per-class NMS 0.3, score >= 0.2, 10..100 boxes; min=max=36 for fixed 36)
    score_thresh: float = 0.2
    nms_thresh: float = 0.3
    min_boxes: int = 10
    max_boxes: int = 100
    candidate_thresh: float = 0.01

    @classmethod
    def from_kwargs(cls, **cfg: Any) -> DetectorConfig:
        """Build from a plain or Hydra mapping; unknown keys are a ConfigError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"detector config: unknown keys {unknown}; "
                              f"known keys: {', '.join(sorted(known))}")
        for key in ("anchor_sizes", "aspect_ratios", "bbox_reg_weights"):
            if key in cfg:
                cfg[key] = tuple(float(v) for v in cfg[key])
        conf = cls(**cfg)
        if conf.pooler not in POOLERS:
            raise ConfigError(f"detector pooler {conf.pooler!r} unknown; choose one of {', '.join(POOLERS)}")
        if len(conf.bbox_reg_weights) != 4:
            raise ConfigError(f"detector bbox_reg_weights needs 4 values, got {list(conf.bbox_reg_weights)}")
        return conf


class _TwoStageDetector(nn.Module):
    """Backbone -> RPN -> RoI heads; subclasses say which map they use and how a region becomes a vector."""

    feature_name = "res5"
    default_pooler_resolution = 1
    default_sampling_ratio = 2
    default_smooth_l1_beta = 1.0

    def __init__(self, backbone: nn.Module, num_classes: int, num_attributes: int = 0,
                 config: DetectorConfig | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"detector needs num_classes >= 1, got {num_classes}")
        if num_attributes < 0:
            raise ConfigError(f"detector needs num_attributes >= 0, got {num_attributes}")
        cfg = config or DetectorConfig()
        self.config = cfg
        self.num_classes = num_classes
        self.num_attributes = num_attributes
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.pooler = cfg.pooler
        self.pooler_resolution = cfg.pooler_resolution or self.default_pooler_resolution
        ratio = cfg.sampling_ratio
        self.sampling_ratio = self.default_sampling_ratio if ratio is None else ratio
        self.rpn = build_rpn(
            shapes[self.feature_name].channels,
            anchor_sizes=cfg.anchor_sizes,
            aspect_ratios=cfg.aspect_ratios,
            pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            nms_thresh=cfg.rpn_nms_thresh,
            fg_iou_thresh=cfg.rpn_fg_iou_thresh,
            bg_iou_thresh=cfg.rpn_bg_iou_thresh,
            batch_size_per_image=cfg.rpn_batch_size_per_image,
            positive_fraction=cfg.rpn_positive_fraction,
            boundary_thresh=cfg.rpn_boundary_thresh,
        )
        box_head, feature_dim = self._build_box_head(shapes, cfg)
        self.roi_heads = RoIHeads(
            feature_dim,
            num_classes,
            num_attributes,
            box_head=box_head,
            batch_size_per_image=cfg.batch_size_per_image,
            positive_fraction=cfg.positive_fraction,
            fg_iou_thresh=cfg.fg_iou_thresh,
            bg_iou_thresh=cfg.bg_iou_thresh,
            bbox_reg_weights=cfg.bbox_reg_weights,
            smooth_l1_beta=self.default_smooth_l1_beta if cfg.smooth_l1_beta is None else cfg.smooth_l1_beta,
            attr_embed_dim=cfg.attr_embed_dim,
            attr_fc_dim=cfg.attr_fc_dim,
            attr_loss_weight=cfg.attr_loss_weight,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            min_boxes=cfg.min_boxes,
            max_boxes=cfg.max_boxes,
            candidate_thresh=cfg.candidate_thresh,
        )

    @property
    def feature_dim(self) -> int:
        """Width of the per-region vector returned as "features"."""
        return self.roi_heads.box_predictor.cls_score.in_features

    def _build_box_head(self, shapes: dict, cfg: DetectorConfig) -> tuple[nn.Module | None, int]:
        raise NotImplementedError

    def box_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """One vector per box (boxes in input-image pixels, one tensor per image)."""
        raise NotImplementedError

    @property
    def stride(self) -> int:
        # Read each time: set_res5_dilation() changes the res5 stride of the same backbone.
        return int(self.backbone.output_shape()[self.feature_name].stride)

    def _pool(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        return pool_regions(features, boxes, output_size=self.pooler_resolution, stride=self.stride,
                            pooler=self.pooler, sampling_ratio=self.sampling_ratio)

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[Sequence[int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training (module.train() and targets): dict of losses. Eval: one dict of detections per image."""
        sizes = _check_inputs(images, image_sizes, targets, self.training, self.num_classes)
        feats = self.backbone.forward_until(images, self.feature_name)
        self.rpn.anchor_generator.stride = self.stride
        image_list = ImageList(images, sizes)
        if self.training:
            proposals, rpn_losses = self.rpn(image_list, {self.feature_name: feats}, targets)
            samples: RoISamples = self.roi_heads.sample(proposals, targets)
            x = self.box_features(feats, samples.proposals)
            return {
                "loss_rpn_cls": rpn_losses["loss_objectness"],
                "loss_rpn_box": rpn_losses["loss_rpn_box_reg"],
                **self.roi_heads.losses(x, samples),
            }
        proposals, _ = self.rpn(image_list, {self.feature_name: feats})
        return self.roi_heads.inference(self.box_features(feats, proposals), proposals, sizes)


class GridDetector(_TwoStageDetector):
    """grid-feats-vqa detector: everything up to res5 is backbone, RoI head is 1x1 pooling + 2 FC on res5."""

    feature_name = "res5"

    def _build_box_head(self, shapes: dict, cfg: DetectorConfig) -> tuple[nn.Module | None, int]:
        in_dim = shapes["res5"].channels * self.pooler_resolution**2
        return FCBoxHead(in_dim, cfg.fc_dim), cfg.fc_dim

    def box_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        return self.roi_heads.box_head(self._pool(features, boxes))


class C4Detector(_TwoStageDetector):
    """bottom-up-attention C4 detector (detectron2 Res5ROIHeads): RPN and 14x14 RoIAlign on res4, the
    backbone's res5 stage per region, mean-pooled to one res5-wide vector."""

    feature_name = "res4"
    default_pooler_resolution = 14
    default_sampling_ratio = 0
    default_smooth_l1_beta = 0.0

    def _build_box_head(self, shapes: dict, cfg: DetectorConfig) -> tuple[nn.Module | None, int]:
        # res5 stays the backbone's (backbone.res5): registering it here too would duplicate its weights.
        return None, shapes["res5"].channels

    def box_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        return self.backbone.res5(self._pool(features, boxes)).mean(dim=(2, 3))


def build_detector(kind: str, backbone: nn.Module, num_classes: int, num_attributes: int = 0,
                   **cfg: Any) -> GridDetector | C4Detector:
    """`kind` "grid" (1x1 RoI head on res5) or "c4" (bottom-up region detector); cfg: DetectorConfig
    fields."""
    config = DetectorConfig.from_kwargs(**cfg)
    if kind == "grid":
        return GridDetector(backbone, num_classes, num_attributes, config)
    if kind == "c4":
        return C4Detector(backbone, num_classes, num_attributes, config)
    raise ConfigError(f"detector kind {kind!r} unknown; choose one of {', '.join(KINDS)}")


def _check_inputs(
    images: Tensor,
    image_sizes: Sequence[Sequence[int]],
    targets: list[dict[str, Tensor]] | None,
    training: bool,
    num_classes: int,
) -> list[tuple[int, int]]:
    if images.ndim != 4:
        raise ValueError(f"detector expects images [B, 3, H, W], got shape {tuple(images.shape)}")
    if len(image_sizes) != images.shape[0]:
        raise ValueError(f"detector got {images.shape[0]} images but {len(image_sizes)} image_sizes")
    sizes = [(int(s[0]), int(s[1])) for s in image_sizes]
    H, W = images.shape[-2:]
    bad = [s for s in sizes if not (0 < s[0] <= H and 0 < s[1] <= W)]
    if bad:
        raise ValueError(f"image size {bad[0]} is empty or larger than the padded batch {H}x{W}")
    if not training:
        return sizes
    if targets is None or len(targets) != len(sizes):
        raise ValueError(f"detector training needs one target dict per image ({len(sizes)}), got "
                         f"{'none' if targets is None else len(targets)}")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if boxes is None or labels is None:
            raise ValueError(f"target {i} lacks 'boxes' or 'labels' (keys: {sorted(t)})")
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"target {i} boxes must be float [N, 4] xyxy, got {boxes.dtype} "
                             f"{tuple(boxes.shape)}")
        if labels.shape != (boxes.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"target {i} labels must be int64 [{boxes.shape[0]}], got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
            raise ValueError(f"target {i} labels must be in 1..{num_classes} (0 = background), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        attrs = t.get("attributes")
        if attrs is not None and (attrs.ndim != 2 or attrs.shape[0] != boxes.shape[0]):
            raise ValueError(f"target {i} attributes must be [{boxes.shape[0]}, M] (-1 padded), got "
                             f"{tuple(attrs.shape)}")
    return sizes


# -- detectron2 checkpoint heads ----------------------------------------------------------------------------
_D2_RPN = "proposal_generator.rpn_head."
_D2_ROI = "roi_heads."


def detectron2_heads_to_detector(
    sd: dict[str, Tensor], *, num_sizes: int = 5, num_ratios: int = 3
) -> tuple[dict[str, Tensor], list[str]]:
    """Map grid-feats-vqa (detectron2) head weights to our detector keys; returns (converted, not converted).

    Pure state-dict function (backbone keys are left for gridvqa.models.convert and come back in the second
    list, as does anything unrecognised). It handles what differs between the two layouts:
    - detectron2 puts the background class last; we put it first: cls_score and obj_embed rows rotate.
    - detectron2 class-specific bbox_pred has num_classes*4 rows (no background); we have (num_classes+1)*4
      with an unused block 0, here zero (a class-agnostic 4-row bbox_pred is copied to every class).
    - detectron2 cell anchors are size-major (for size: for ratio), torchvision's ratio-major: the RPN's
      objectness channels and anchor_deltas channel blocks of 4 are permuted (num_sizes x num_ratios anchors).
    """
    num_anchors = num_sizes * num_ratios
    # ours[t] = d2[perm[t]]: our anchor t is (ratio t // S, size t % S), detectron2's index size*R + ratio.
    perm = torch.tensor([(t % num_sizes) * num_ratios + t // num_sizes for t in range(num_anchors)])
    cls_key = _D2_ROI + "box_predictor.cls_score.weight"
    num_classes = sd[cls_key].shape[0] - 1 if cls_key in sd else None
    out: dict[str, Tensor] = {}
    rest: list[str] = []
    for key, v in sd.items():
        if key.startswith(_D2_RPN):
            name, _, param = key[len(_D2_RPN):].rpartition(".")
            if name == "conv":
                out[f"rpn.head.conv.0.0.{param}"] = v
            elif name in ("objectness_logits", "anchor_deltas"):
                per = 1 if name == "objectness_logits" else 4
                if v.shape[0] != num_anchors * per:
                    raise ConfigError(f"{key} has {v.shape[0]} channels, expected {num_anchors * per} for "
                                      f"{num_sizes} anchor sizes x {num_ratios} ratios")
                blocks = v.reshape(num_anchors, per, *v.shape[1:])[perm]
                ours = "cls_logits" if name == "objectness_logits" else "bbox_pred"
                out[f"rpn.head.{ours}.{param}"] = blocks.reshape(v.shape)
            else:
                rest.append(key)
        elif key.startswith(_D2_ROI + "box_head.fc"):
            out[key] = v
        elif key.startswith(_D2_ROI + "box_predictor.cls_score."):
            out[key] = torch.cat([v[-1:], v[:-1]])
        elif key.startswith(_D2_ROI + "box_predictor.bbox_pred."):
            out[key] = _bbox_pred_with_background(key, v, num_classes)
        elif key == _D2_ROI + "attribute_predictor.obj_embed.weight":
            out[key] = torch.cat([v[-1:], v[:-1]])
        elif key.startswith(_D2_ROI + "attribute_predictor."):
            out[key] = v
        else:
            rest.append(key)
    return out, rest


def _bbox_pred_with_background(key: str, v: Tensor, num_classes: int | None) -> Tensor:
    if num_classes is None:
        num_classes = v.shape[0] // 4
    if v.shape[0] == 4:  # class-agnostic regression
        return v.repeat(num_classes + 1, *([1] * (v.ndim - 1)))
    if v.shape[0] != num_classes * 4:
        raise ConfigError(f"{key} has {v.shape[0]} rows; expected {num_classes * 4} (class-specific, "
                          f"{num_classes} classes without background) or 4 (class-agnostic)")
    return torch.cat([torch.zeros_like(v[:4]), v])
