"""Real HDF5 feature files (random contents) for the images of a VQA split, for config/training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gridvqa.data.features import FeatureWriter
from gridvqa.data.vqa2 import load_split


def write_features(root: Path, kind: str, split: str, dim: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ids = sorted({e.image_id for e in load_split(root, split, with_answers=False)})
    path = root / "features" / f"{kind}_{split}.h5"
    with FeatureWriter(path, kind, {"test": "random"}, overwrite=True) as w:
        for i in ids:
            if kind == "grid":
                w.add_grid(i, rng.standard_normal((3, 4, dim)).astype(np.float32), (96, 128))
            else:
                n = int(rng.integers(10, 16))
                xy = rng.uniform(0, 60, (n, 2))
                boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1).astype(np.float32)
                w.add_region(i, rng.standard_normal((n, dim)).astype(np.float32), boxes, (96, 128))
    return path
