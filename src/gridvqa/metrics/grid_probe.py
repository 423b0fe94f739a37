"""How much of each object the grid carries: linear probes on the grid cell at every object's centre.

For Visual Genome-format annotations (the built-in data or real VG): run a backbone over the images,
take the feature cell under each box centre, fit a linear classifier on the first half of the objects
and score the second half — object class (overall, and for the smaller / larger half of the boxes)
and top-1 attribute (right when the top-scored attribute is one of the object's). A grid that a VQA
head can read an object from scores high here; figures in docs/results.md (VG pre-training recipes).

Hand-written (a few lines of torch L-BFGS): scikit-learn is not a dependency.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gridvqa.data.images import ImagePipeline, load_image
from gridvqa.data.vg import VisualGenome
from gridvqa.errors import DataError


@dataclass
class CellSamples:
    """One row per object: its centre cell's feature vector, class, attributes (-1 padded), box area."""

    features: torch.Tensor  # [N, C] float32
    labels: torch.Tensor  # [N] int64
    attributes: torch.Tensor  # [N, M] int64
    areas: torch.Tensor  # [N] float32, in input pixels


@torch.no_grad()
def centre_cells(
    backbone: nn.Module,
    vg_dir: str | os.PathLike,
    pipeline: ImagePipeline,
    images: int = 800,
    feature: str = "res5",
) -> tuple[CellSamples, VisualGenome]:
    """Features of the cell under each box centre, for the first `images` annotated VG images."""
    vg = VisualGenome(vg_dir)
    recs = vg.records[:images]
    if not recs:
        raise DataError(f"{vg_dir}: no annotated images to probe")
    backbone.eval()
    feats, labels, attrs, areas = [], [], [], []
    for rec in recs:
        x, boxes, info = pipeline(load_image(vg.image_path(rec.image_id)), torch.from_numpy(rec.boxes))
        fmap = backbone(x[None])[feature][0]
        h, w = x.shape[-2:]
        cy = ((boxes[:, 1] + boxes[:, 3]) / 2 * fmap.shape[1] / h).long().clamp(0, fmap.shape[1] - 1)
        cx = ((boxes[:, 0] + boxes[:, 2]) / 2 * fmap.shape[2] / w).long().clamp(0, fmap.shape[2] - 1)
        feats.append(fmap[:, cy, cx].T.float())
        labels.append(torch.from_numpy(rec.labels))
        attrs.append(torch.from_numpy(rec.attributes))
        areas.append((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    cat = CellSamples(torch.cat(feats), torch.cat(labels), torch.cat(attrs), torch.cat(areas).float())
    return cat, vg


def fit_linear(x: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3, max_iter: int = 300) -> nn.Linear:
    """Softmax regression by L-BFGS; `targets` are class ids [N] or per-row distributions [N, K]."""
    k = int(targets.max()) + 1 if targets.dim() == 1 else targets.shape[1]
    lin = nn.Linear(x.shape[1], k)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), targets) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin


def probe(samples: CellSamples, num_attributes: int) -> dict[str, float | int]:
    """Held-out accuracies of linear probes (fit on the first half of the objects, scored on the rest)."""
    n = samples.features.shape[0]
    if n < 4:
        raise DataError(f"grid probe: {n} objects are too few to fit and score a probe")
    x = samples.features
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # standardised: one l2 strength suits every backbone
    half = n // 2
    out: dict[str, float | int] = {"objects": n, "test_objects": n - half}
    with torch.no_grad():
        pred = fit_linear(x[:half], samples.labels[:half])(x[half:]).argmax(1)
    right = pred == samples.labels[half:]
    small = samples.areas[half:] <= samples.areas.median()
    out["class_acc"] = float(right.float().mean())
    out["class_acc_small"] = float(right[small].float().mean()) if small.any() else float("nan")
    out["class_acc_large"] = float(right[~small].float().mean()) if (~small).any() else float("nan")
    out["class_chance"] = float(np.bincount(samples.labels.numpy()).max() / n)
    has = (samples.attributes >= 0).any(1)
    if num_attributes > 0 and has[:half].any() and has[half:].any():
        onehot = torch.zeros(n, num_attributes)
        rows, cols = torch.where(samples.attributes >= 0)
        onehot[rows, samples.attributes[rows, cols]] = 1.0
        dist = onehot / onehot.sum(1, keepdim=True).clamp(min=1)
        lin = fit_linear(x[:half][has[:half]], dist[:half][has[:half]])
        with torch.no_grad():
            top = lin(x[half:][has[half:]]).argmax(1)
        out["attribute_top1_acc"] = float(onehot[half:][has[half:]].gather(1, top[:, None]).mean())
    return out


def probe_grid(
    backbone: nn.Module,
    vg_dir: str | os.PathLike,
    pipeline: ImagePipeline,
    images: int = 800,
    feature: str = "res5",
) -> dict[str, float | int]:
    """`centre_cells` then `probe`: the figures `scripts/probe_grid.py` prints."""
    samples, vg = centre_cells(backbone, vg_dir, pipeline, images, feature)
    return probe(samples, vg.num_attributes)
