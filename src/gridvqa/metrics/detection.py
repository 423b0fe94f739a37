"""Detection average precision at one IoU threshold (AP50 by default), as a torchmetrics Metric.

Hand-written because torchmetrics' MeanAveragePrecision needs pycocotools / faster-coco-eval (not installed)
and we only need one IoU threshold. It follows COCOeval for that threshold:
- per image, detections are ranked by score (at most `max_detections_per_image`, COCO's maxDets=100) and each
  one takes the unmatched ground truth of its class with the highest IoU >= the threshold (a duplicate of an
  already matched box is a false positive);
- per class, precision is made monotone and read at 101 recall points 0, 0.01, ..., 1 ("coco101", the default,
  what detectron2 reports as bbox AP50) or integrated over every recall step ("voc_all", VOC2010+ all-point);
- the mean is over the classes that have ground truth; detections of classes without any are ignored.
Matching happens in update(), so the states are flat per-detection tensors that DDP simply concatenates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import box_iou

INTERPOLATIONS = ("coco101", "voc_all")


def match_detections(
    det_boxes: Tensor, det_scores: Tensor, det_labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
    iou_thresh: float = 0.5,
) -> Tensor:
    """True-positive flag per detection of one image (COCO greedy matching, class by class, by score)."""
    tp = np.zeros(det_boxes.shape[0], dtype=bool)
    if det_boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return torch.from_numpy(tp)
    iou = box_iou(det_boxes.float(), gt_boxes.float()).cpu().numpy()
    same = det_labels.cpu().numpy()[:, None] == gt_labels.cpu().numpy()[None, :]
    iou = np.where(same, iou, -1.0)
    taken = np.zeros(gt_boxes.shape[0], dtype=bool)
    for d in torch.argsort(det_scores, descending=True, stable=True).cpu().numpy():
        cand = np.where(taken, -1.0, iou[d])
        g = int(cand.argmax())
        if cand[g] >= iou_thresh:
            taken[g] = True
            tp[d] = True
    return torch.from_numpy(tp)


def average_precision(scores: Tensor, tp: Tensor, num_gt: int, interpolation: str = "coco101") -> float:
    """AP of one class from its detections' scores and true-positive flags and its ground-truth count."""
    if num_gt <= 0:
        raise ValueError("average_precision needs at least one ground-truth box")
    if scores.numel() == 0:
        return 0.0
    order = torch.argsort(scores, descending=True, stable=True)
    hits = tp[order].double()
    ctp = torch.cumsum(hits, 0)
    cfp = torch.cumsum(1 - hits, 0)
    recall = (ctp / num_gt).numpy()
    precision = (ctp / (ctp + cfp)).numpy()
    # Interpolated precision: the best precision at this recall or any higher one.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    if interpolation == "coco101":
        points = np.linspace(0.0, 1.0, 101)
        idx = np.searchsorted(recall, points, side="left")
        return float(np.where(idx < len(recall), precision[np.minimum(idx, len(recall) - 1)], 0.0).mean())
    if interpolation == "voc_all":
        prev = np.concatenate([[0.0], recall[:-1]])
        return float(((recall - prev) * precision).sum())
    raise ValueError(f"interpolation {interpolation!r} unknown; choose one of {', '.join(INTERPOLATIONS)}")


class DetectionAP(Metric):
    """AP at `iou_thresh` per class and its mean over classes present in the ground truth.

    update(preds, targets): preds [{boxes [K,4] xyxy, scores [K], labels [K]}],
    targets [{boxes [N,4], labels [N]}].
    compute() -> {"ap50": Tensor scalar (0 when there is no ground truth at all),
    "ap50_per_class": Tensor [num_classes + 1] indexed by label (NaN for classes without ground truth),
    "num_classes_evaluated": int}.
    The key is "ap{round(100 * iou_thresh)}".
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        num_classes: int | None = None,
        iou_thresh: float = 0.5,
        interpolation: str = "coco101",
        max_detections_per_image: int | None = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r} unknown; "
                             f"choose one of {', '.join(INTERPOLATIONS)}")
        self.num_classes = num_classes
        self.iou_thresh = iou_thresh
        self.interpolation = interpolation
        self.max_detections_per_image = max_detections_per_image
        self.key = f"ap{round(100 * iou_thresh)}"
        for name in ("det_scores", "det_labels", "det_tp", "gt_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"DetectionAP.update got {len(preds)} predictions but {len(targets)} targets")
        for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
            boxes, scores, labels = _fields(p, ("boxes", "scores", "labels"), f"prediction {i}")
            gt_boxes, gt_labels = _fields(t, ("boxes", "labels"), f"target {i}")
            k = self.max_detections_per_image
            if k is not None and scores.numel() > k:
                top = torch.argsort(scores, descending=True, stable=True)[:k]
                boxes, scores, labels = boxes[top], scores[top], labels[top]
            tp = match_detections(boxes, scores, labels, gt_boxes, gt_labels, self.iou_thresh)
            # Every state in the metric's float dtype: under DDP torchmetrics gives a rank without data an
            # empty tensor of that dtype, and all_gather needs one dtype on all ranks (labels are exact).
            for state, value in ((self.det_scores, scores), (self.det_labels, labels), (self.det_tp, tp),
                                 (self.gt_labels, gt_labels)):
                state.append(value.detach().reshape(-1).to(device=self.device, dtype=self.dtype))

    def compute(self) -> dict[str, Tensor | int]:
        scores = _cat(self.det_scores, torch.float32).cpu()
        labels = _cat(self.det_labels, torch.int64).cpu()
        tp = _cat(self.det_tp, torch.bool).cpu()
        gt = _cat(self.gt_labels, torch.int64).cpu()
        classes, counts = torch.unique(gt, return_counts=True)
        size = max(0 if self.num_classes is None else self.num_classes + 1,
                   int(gt.max()) + 1 if gt.numel() else 0)
        per_class = torch.full((size,), float("nan"), dtype=torch.float64)
        for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
            m = labels == c
            per_class[c] = average_precision(scores[m], tp[m], n, self.interpolation)
        mean = per_class[classes].mean() if classes.numel() else torch.tensor(0.0, dtype=torch.float64)
        return {self.key: mean.float(), f"{self.key}_per_class": per_class,
                "num_classes_evaluated": len(classes)}


def _fields(d: dict[str, Tensor], names: tuple[str, ...], what: str) -> list[Tensor]:
    missing = [n for n in names if n not in d]
    if missing:
        raise ValueError(f"DetectionAP: {what} lacks {missing} (keys: {sorted(d)})")
    out = [torch.as_tensor(d[n]) for n in names]
    n = out[0].shape[0]
    if out[0].ndim != 2 or out[0].shape[1] != 4 or any(x.shape != (n,) for x in out[1:]):
        raise ValueError(f"DetectionAP: {what} needs boxes [N, 4] and {list(names[1:])} [N], got "
                         f"{[tuple(x.shape) for x in out]}")
    return out


def _cat(state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    # After a DDP sync torchmetrics leaves a list state concatenated into one tensor.
    if isinstance(state, Tensor):
        return state.to(dtype)
    return dim_zero_cat(state).to(dtype) if state else torch.zeros(0, dtype=dtype)
