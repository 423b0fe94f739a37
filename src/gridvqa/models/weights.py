"""Saving weights as safetensors, atomically (a half-written file is never visible), and the pixel
normalisation a weights file records.

Weights only give the features they were trained for on inputs normalised as in training (an X-101 from
grid-feats-vqa expects BGR 0-255 minus the mean divided by the ImageNet std, an MSRA R-50 std 1). So every
writer of backbone / detector weights records it in the safetensors metadata under `pixel_norm`
(json {"kind", "mean", "std"}; see gridvqa.data.images.Normalization), and every loader builds its image
pipeline from it (gridvqa.data.images.build_image_pipeline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gridvqa.data.images import NORMS, Normalization
from gridvqa.data.jsonio import atomic_write_bytes
from gridvqa.errors import DataError

PIXEL_NORM_KEY = "pixel_norm"


def save_safetensors(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def pixel_norm_metadata(norm: Normalization | None) -> dict[str, str]:
    """The metadata entry recording `norm` ({} for None: nothing known to record)."""
    return {} if norm is None else {PIXEL_NORM_KEY: json.dumps(norm.to_dict())}


def recorded_pixel_norm(path: str | os.PathLike) -> Normalization | None:
    """The pixel normalisation `path` records; None for files that record none (.pth, older files).

    An unreadable safetensors file is left to the weights loader, which names it with its own message;
    a `pixel_norm` entry that is not a valid normalisation is a DataError naming the file.
    """
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(PIXEL_NORM_KEY)
    except (SafetensorError, OSError):
        return None
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        if d["kind"] not in NORMS:
            raise ValueError(d["kind"])
        return Normalization.make(d["kind"], d["mean"], d["std"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        expected = f"json {{kind: {'|'.join(NORMS)}, mean: [3], std: [3]}}"
        raise DataError(f"{path}: the safetensors metadata `{PIXEL_NORM_KEY}` is not a pixel normalisation "
                        f"(expected {expected}, found {raw[:80]!r})") from None
