"""RoI heads shared by the grid (1x1-pooled, 2xFC) and C4 (res5 per region) detectors.

Class layout follows torchvision: index 0 is background, objects are 1..num_classes. The sampling, box
coding and NMS come from torchvision (Matcher, BalancedPositiveNegativeSampler, BoxCoder, batched_nms,
roi_align / roi_pool); torchvision's own RoIHeads is not reused because it returns neither the proposal
each detection came from (region features need it) nor the matched ground truth (the attribute head
needs its attributes), and it has no min-boxes-per-image rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align, roi_pool

from gridvqa.errors import ConfigError

POOLERS = ("roi_align", "roi_pool")


def pool_regions(
    features: Tensor,
    boxes: list[Tensor],
    *,
    output_size: int,
    stride: int,
    pooler: str = "roi_align",
    sampling_ratio: int = 2,
) -> Tensor:
    """[R, C, s, s] region maps: `roi_align` is detectron2's ROIAlignV2 (aligned=True), `roi_pool` the
    true (quantised, max) RoIPool."""
    if pooler not in POOLERS:
        raise ConfigError(f"detector pooler {pooler!r} unknown; choose one of {', '.join(POOLERS)}")
    scale = 1.0 / stride
    # Pool in at least float32: box corners of a 1000-pixel image are not exact in half / bfloat16.
    dtype = torch.promote_types(features.dtype, torch.float32)
    x = features.to(dtype)
    rois = [b.to(dtype) for b in boxes]
    if pooler == "roi_align":
        out = roi_align(x, rois, output_size, spatial_scale=scale, sampling_ratio=sampling_ratio,
                        aligned=True)
    else:
        out = roi_pool(x, rois, output_size, spatial_scale=scale)
    return out.to(features.dtype)


class FCBoxHead(nn.Module):
    """Flatten the pooled region, then fc1 -> ReLU -> fc2 -> ReLU (detectron2 FastRCNNConvFCHead, 2 FC)."""

    def __init__(self, in_dim: int, fc_dim: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.output_size = fc_dim
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)  # detectron2's c2_xavier_fill
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """(num_classes+1)-way classifier and class-specific box deltas; row block 0 is the background."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # float32 out: BoxCoder casts boxes to the deltas' dtype, too coarse in bfloat16 under autocast
        return self.cls_score(x).float(), self.bbox_pred(x).float()


class AttributePredictor(nn.Module):
    """grid-feats-vqa AttributePredictor: [box feature, embedding of the object class] -> FC+ReLU -> logits.

    `num_attributes` logits with no extra "no attribute" class (as the reference: padding is -1 and ignored).
    `obj_embed` has num_classes+1 rows; row 0 is the background (detectron2 keeps it last).
    """

    def __init__(self, in_dim: int, num_classes: int, num_attributes: int, embed_dim: int = 256,
                 fc_dim: int = 512) -> None:
        super().__init__()
        self.obj_embed = nn.Embedding(num_classes + 1, embed_dim)
        self.fc = nn.Sequential(nn.Linear(in_dim + embed_dim, fc_dim), nn.ReLU())
        self.attr_score = nn.Linear(fc_dim, num_attributes)
        nn.init.normal_(self.attr_score.weight, std=0.01)
        nn.init.zeros_(self.attr_score.bias)

    def forward(self, x: Tensor, obj_labels: Tensor) -> Tensor:
        return self.attr_score(self.fc(torch.cat([x, self.obj_embed(obj_labels)], dim=1)))


def attribute_loss(scores: Tensor, labels: Tensor, loss_weight: float = 0.2) -> Tensor:
    """Softmax CE per attribute label (labels [n, M], -1 = padding), each box's terms weighted by
    1/(its label count), summed over boxes, divided by the number of boxes with any label, times weight.

    Same value as grid-feats-vqa's AttributePredictor.loss, written without its [n*M, A] expansion.
    """
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"attribute labels for {labels.shape[0]} boxes but scores for {scores.shape[0]}")
    valid = labels >= 0
    counts = valid.sum(dim=1)
    logp = scores.float().log_softmax(dim=-1)
    nll = -logp.gather(1, labels.clamp(min=0)) * valid
    per_box = nll.sum(dim=1) / counts.clamp(min=1)
    n_valid = int((counts > 0).sum())
    if n_valid == 0:
        return scores.sum() * 0.0  # keeps the graph (DDP expects every parameter to get a gradient)
    return per_box.sum() * loss_weight / n_valid


def fast_rcnn_losses(
    class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor, beta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """detectron2 FastRCNNOutputs losses: mean CE over the sampled RoIs; smooth-L1 (beta=0: L1) on the
    ground-truth class's deltas of the foreground RoIs, summed and divided by the number of sampled RoIs."""
    loss_cls = F.cross_entropy(class_logits, labels)
    fg = torch.where(labels > 0)[0]
    deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[fg, labels[fg]]
    if beta > 0:
        box = F.smooth_l1_loss(deltas, regression_targets[fg], beta=beta, reduction="sum")
    else:
        box = F.l1_loss(deltas, regression_targets[fg], reduction="sum")
    return loss_cls, box / max(labels.numel(), 1)


@dataclass
class RoISamples:
    """Sampled RoIs of a batch: per-image proposal boxes, and concatenated labels / targets / attributes."""

    proposals: list[Tensor]
    labels: Tensor  # [R] int64, 0 = background
    regression_targets: Tensor  # [R, 4]
    attributes: Tensor  # [R, M] int64, -1 padded (all -1 for background RoIs)


class RoIHeads(nn.Module):
    """Sampling, box predictor, attribute predictor, losses and inference; the detector supplies the
    per-region feature vectors (1x1 pool + FC for the grid detector, res5 + mean for C4)."""

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        num_attributes: int,
        *,
        box_head: nn.Module | None = None,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 1.0,
        attr_embed_dim: int = 256,
        attr_fc_dim: int = 512,
        attr_loss_weight: float = 0.2,
        score_thresh: float = 0.2,
        nms_thresh: float = 0.3,
        min_boxes: int = 10,
        max_boxes: int = 100,
        candidate_thresh: float = 0.01,
    ) -> None:
        super().__init__()
        if not 0 <= min_boxes <= max_boxes:
            raise ConfigError(f"detector needs 0 <= min_boxes <= max_boxes, got {min_boxes} and {max_boxes}")
        self.num_classes = num_classes
        self.box_head = box_head
        self.box_predictor = BoxPredictor(feature_dim, num_classes)
        self.attribute_predictor = (
            AttributePredictor(feature_dim, num_classes, num_attributes, attr_embed_dim, attr_fc_dim)
            if num_attributes > 0 else None
        )
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image,
                                                                       positive_fraction)
        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in bbox_reg_weights))
        self.smooth_l1_beta = smooth_l1_beta
        self.attr_loss_weight = attr_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.min_boxes = min_boxes
        self.max_boxes = max_boxes
        self.candidate_thresh = candidate_thresh

    # -- training -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> RoISamples:
        """Append the ground-truth boxes to the proposals, match at IoU 0.5, sample fg/bg per image."""
        props, labels, reg, attrs = [], [], [], []
        width = max((t["attributes"].shape[-1] for t in targets if t.get("attributes") is not None),
                    default=1)
        for p, t in zip(proposals, targets, strict=True):
            gt_boxes = t["boxes"].to(p.dtype)
            gt_labels = t["labels"]
            gt_attrs = torch.full((gt_boxes.shape[0], width), -1, dtype=torch.int64, device=p.device)
            a = t.get("attributes")
            if a is not None and a.numel():
                gt_attrs[:, : a.shape[1]] = a
            p = torch.cat([p, gt_boxes])
            if gt_boxes.shape[0] == 0:
                lab = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                idx = torch.zeros_like(lab)
                gt_boxes = torch.zeros((1, 4), dtype=p.dtype, device=p.device)
                gt_attrs = torch.full((1, width), -1, dtype=torch.int64, device=p.device)
            else:
                matched = self.proposal_matcher(box_iou(gt_boxes, p))
                idx = matched.clamp(min=0)
                lab = gt_labels[idx].clone()
                lab[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
                lab[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            pos, neg = self.fg_bg_sampler([lab])
            keep = torch.where(pos[0].bool() | neg[0].bool())[0]
            p, lab, idx = p[keep], lab[keep], idx[keep]
            a = gt_attrs[idx].clone()
            a[lab <= 0] = -1
            props.append(p)
            labels.append(lab)
            reg.append(self.box_coder.encode_single(gt_boxes[idx], p))
            attrs.append(a)
        return RoISamples(props, torch.cat(labels), torch.cat(reg), torch.cat(attrs))

    def losses(self, box_features: Tensor, samples: RoISamples) -> dict[str, Tensor]:
        """loss_cls, loss_box_reg and (with attributes) loss_attr for the sampled RoIs' feature vectors."""
        logits, deltas = self.box_predictor(box_features)
        loss_cls, loss_box = fast_rcnn_losses(logits, deltas, samples.labels, samples.regression_targets,
                                              self.smooth_l1_beta)
        out = {"loss_cls": loss_cls, "loss_box_reg": loss_box}
        if self.attribute_predictor is not None:
            fg = torch.where(samples.labels > 0)[0]
            scores = self.attribute_predictor(box_features[fg], samples.labels[fg])
            out["loss_attr"] = attribute_loss(scores, samples.attributes[fg], self.attr_loss_weight)
        return out

    # -- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(
        self, box_features: Tensor, proposals: list[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per-image detections, bottom-up style: per-class NMS, a box's score is its best surviving class,
        keep those >= score_thresh, at least min_boxes and at most max_boxes per image."""
        logits, deltas = self.box_predictor(box_features)
        results = []
        start = 0
        for props, size in zip(proposals, image_sizes, strict=True):
            n = props.shape[0]
            sl = slice(start, start + n)
            start += n
            res = self._select(logits[sl], deltas[sl], props, tuple(size))
            res["features"] = box_features[sl][res.pop("index")]
            if self.attribute_predictor is not None:
                res["attr_scores"] = self.attribute_predictor(res["features"], res["labels"]).softmax(-1)
            results.append(res)
        return results

    def _select(
        self, logits: Tensor, deltas: Tensor, props: Tensor, size: tuple[int, int]
    ) -> dict[str, Tensor]:
        n = props.shape[0]
        probs = logits.softmax(-1)[:, 1:]  # [n, C], background dropped
        boxes = self.box_coder.decode_single(deltas, props).reshape(n, -1, 4)[:, 1:]
        boxes = clip_boxes_to_image(boxes, size)
        # Per-class NMS over (proposal, class) pairs; pairs far below any useful score are left out only
        # to bound the work for 1600 classes (they could only suppress pairs scoring even lower).
        pi, ci = torch.where(probs >= self.candidate_thresh)
        keep = batched_nms(boxes[pi, ci], probs[pi, ci], ci, self.nms_thresh)
        kept = torch.zeros_like(probs)
        kept[pi[keep], ci[keep]] = probs[pi[keep], ci[keep]]
        best_kept, best_kept_cls = kept.max(dim=1)
        raw_best, raw_cls = probs.max(dim=1)
        survived = best_kept > 0
        cls = torch.where(survived, best_kept_cls, raw_cls)
        # Rank survivors by their best kept score; boxes suppressed in every class only fill up to
        # min_boxes, ranked after them by raw score (bottom-up ranks them at 0, in arbitrary order).
        order = torch.argsort(raw_best, descending=True, stable=True)
        order = order[torch.argsort(best_kept[order], descending=True, stable=True)]
        count = int((best_kept >= self.score_thresh).sum())
        sel = order[: min(max(count, self.min_boxes), self.max_boxes, n)]
        cls_sel = cls[sel]
        return {
            "boxes": boxes[sel, cls_sel],
            "scores": probs[sel, cls_sel],
            "labels": cls_sel + 1,
            "proposal_boxes": props[sel],
            "index": sel,
        }
