"""`python -m gridvqa.data.synthetic OUT_DIR [--train-images N] ...`"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gridvqa.data.synthetic.writers import generate
from gridvqa.errors import GridVQAError


def _non_negative(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    from gridvqa.data import synthetic

    ap = argparse.ArgumentParser(
        prog="python -m gridvqa.data.synthetic", description=synthetic.__doc__.splitlines()[0]
    )
    ap.add_argument("out_dir", help="data root to write (official VQA v2 / COCO / VG layout)")
    ap.add_argument("--train-images", type=_non_negative, default=2000)
    ap.add_argument("--val-images", type=_non_negative, default=500)
    ap.add_argument("--test-images", type=_non_negative, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions-per-image", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        generate(args.out_dir, args.train_images, args.val_images, args.test_images, seed=args.seed,
                 questions_per_image=args.questions_per_image, verbose=True)
    except (GridVQAError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
