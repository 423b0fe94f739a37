"""FeatureWriter in the caller's thread vs in a background thread, behind a producer that waits on compute.

    python scripts/bench_feature_writer.py --shape 38 63 2048 --images 64 --compute-ms 20 --commit-images 16

The producer stands for the extraction loop on a GPU: per image it waits `--compute-ms` (time.sleep,
which releases the GIL as a wait on the device does) and hands one float16 map of `--shape` to the
writer. `foreground` commits every `--commit-images` images with flush() (as the extraction loop does);
`background` passes the same commit_images to FeatureWriter(background=True). Both files get the same
images; rows report ms per image, and the ratio foreground / background of the per-image time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gridvqa.data.features import FeatureWriter


def run_mode(folder: Path, mode: str, args: argparse.Namespace, maps: list[np.ndarray]) -> dict[str, Any]:
    background = mode == "background"
    path = folder / f"{mode}.h5"
    start = time.perf_counter()
    with FeatureWriter(
        path,
        "grid",
        {"bench": "feature_writer"},
        overwrite=True,
        consolidate=False,
        commit_images=args.commit_images if background else None,
        background=background,
        queue_size=args.queue_size,
    ) as writer:
        for i in range(args.images):
            time.sleep(args.compute_ms / 1000)
            writer.add_grid(i, maps[i % len(maps)], (600, 1000))
            if not background and (i + 1) % args.commit_images == 0:
                writer.flush()
        writer.flush()
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "ms_per_image": 1000 * seconds / args.images}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[38, 63, 2048], help="H W C of each map")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--compute-ms", type=float, default=20.0, help="producer's wait per image")
    p.add_argument("--commit-images", type=int, default=16)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--folder", type=Path, default=None, help="where the files go (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the record here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal(args.shape).astype(np.float16) for _ in range(4)]
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        rows = [run_mode(Path(tmp), mode, args, maps) for mode in ("foreground", "background")]
    record = {"settings": vars(args) | {"folder": str(args.folder), "json": None}, "rows": rows}
    record["ratio_foreground_over_background"] = rows[0]["ms_per_image"] / rows[1]["ms_per_image"]
    for r in rows:
        print(f"{r['mode']:>10}: {r['ms_per_image']:.1f} ms/image ({r['seconds']:.2f} s)")
    print(
        f"compute alone: {args.compute_ms:.1f} ms/image; foreground / background: "
        f"{record['ratio_foreground_over_background']:.2f}x"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
