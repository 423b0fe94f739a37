"""Linear probes on a backbone's grid: how well the cell under each object's centre tells its class and
attributes (Visual Genome-format annotations: the built-in data's vg/ or real VG).

    python scripts/probe_grid.py --weights artifacts/pretrain_vg/backbone.safetensors --size 128 128
    python scripts/probe_grid.py --weights none --short 112 --max-size 160     # a random backbone

Prints one json line; the logic is gridvqa.metrics.grid_probe. Pixels are normalised as the weights
record (see gridvqa.models.weights); a random backbone gets detectron2's default.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gridvqa.data.images import ImageSpec, build_image_pipeline
from gridvqa.metrics.grid_probe import probe_grid
from gridvqa.models.backbone import build_backbone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="backbone safetensors, or 'none' for random weights")
    p.add_argument("--data", default="data/shapes", help="data root holding vg/ (default: data/shapes)")
    p.add_argument("--arch", default="R-tiny")
    p.add_argument("--res5-dilation", type=int, default=2)
    p.add_argument("--feature", default="res5")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="fixed input size (as e2e)")
    p.add_argument("--short", type=int, default=160, help="shorter side when --size is not given")
    p.add_argument("--max-size", type=int, default=224, help="longer side cap when --size is not given")
    p.add_argument("--images", type=int, default=800, help="annotated images (objects split in half)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    weights = None if a.weights == "none" else a.weights
    backbone = build_backbone(a.arch, norm="FrozenBN", freeze_at=0, res5_dilation=a.res5_dilation,
                              out_features=[a.feature], weights=weights)
    spec = ImageSpec(size=a.size) if a.size else ImageSpec(short=a.short, max_size=a.max_size)
    pipeline = build_image_pipeline(spec, weights)
    out = probe_grid(backbone, f"{a.data}/vg", pipeline, a.images, a.feature)
    print(json.dumps({"weights": a.weights, "input": a.size or [a.short, a.max_size], **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
