"""Grid vs region feature extraction speed, side by side on the same backbone, image size and images.

    python -m gridvqa.benchmarks.extraction --arch R-50 --size 600 1000 --images 6 --device cpu --batch 1
    (scripts/bench_extraction.py takes the same flags)

Four timings over the same JPEG files (written to a temp folder, sized so the resize rule gives exactly
--size), each through the real extraction code (DataLoader decoding + resizing, forward, HDF5 writing):
  backbone   the bare backbone forward on the already decoded, resized and batched tensors (no I/O)
  grid       grid extraction: res5 map, stride 32 (--res5-dilation 2: 16), written to HDF5
  region@P   bottom-up C4 region extraction with P test-time proposals (default 1000 and 300)
and, unless --no-breakdown, where the grid run's time goes (same images and settings):
  loader     the extraction's DataLoader alone (decode + resize + collate, pinning on a GPU); its first
             batch waits for the worker start-up, reported apart as startup_seconds
  compute    host->device copy, grid forward and the device->host copy of each map in the file's dtype,
             on already decoded batches (no loader, no writer)
  writer     the FeatureWriter alone, adding and committing as many maps of the grid file's shape and
             dtype; close (consolidation) is reported apart, as it is for grid and region
The main thread does compute + writer while the loader's workers decode ahead, so the grid row can be
no faster than the slower of (compute + writer) and loader.
Random weights (timing only). A random detector keeps few boxes above its thresholds, but the C4 head runs
res5 on *every* post-NMS proposal before scoring (as bottom-up's test-time head does), so the per-region cost
is the real one; the script counts the regions res5 actually ran on and prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from gridvqa.config import conf_dir, register_resolvers
from gridvqa.data.features import FeatureWriter, GridFeatures
from gridvqa.extraction import (
    PRECISIONS,
    ExtractionDataset,
    build_extractor,
    build_pipeline,
    collate_extraction,
    extract,
    extraction_loader,
    folder_images,
    grid_to_host,
    plan_batches,
    prepare_model,
    resolve_device,
)
from gridvqa.models.backbone import ARCHS, default_stride_in_1x1


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """n JPEGs at 0.6x the target size (so the resize really runs) with some shapes on noise."""
    rng = np.random.default_rng(seed)
    h, w = (max(1, round(s * 0.6)) for s in size)
    for i in range(n):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        draw = ImageDraw.Draw(im)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3)))
            draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        im.save(folder / f"COCO_bench_{i + 1:012d}.jpg", quality=90)


def compose_cfg(args: argparse.Namespace, folder: Path, kind: str, proposals: int = 1000):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    overrides = [
        f"kind={kind}",
        "weights=random",
        f"images_dir={folder}",
        f"output={folder}/{kind}_{proposals}.h5",
        f"paths.data_root={folder}",
        f"backbone.name={args.arch}",
        f"backbone.stride_in_1x1={default_stride_in_1x1(args.arch)}",
        f"res5_dilation={args.res5_dilation}",  # not extract.yaml's default (2, for the CPU-sized runs)
        "image_size=null",
        f"short={min(args.size)}",
        f"max_size={max(args.size)}",
        f"batch_size={args.batch}",
        f"num_workers={args.workers}",
        f"device={args.device}",
        f"precision={args.precision}",
        f"region.proposals={proposals}",
        "progress=false",
    ]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("extract", overrides=overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_extraction(cfg, items, device: torch.device) -> dict:
    """One extraction run into a fresh HDF5 file; regions counted at the input of res5."""
    model, prov = build_extractor(cfg)
    prepare_model(model, device, bool(cfg.channels_last))
    warm_up(model, cfg, items, device)
    regions: list[int] = []
    if model.kind == "region":
        model.detector.backbone.res5.register_forward_pre_hook(lambda m, a: regions.append(a[0].shape[0]))
    with FeatureWriter(cfg.output, model.kind, prov, dtype=cfg.dtype, overwrite=True) as writer:
        s = extract(
            items,
            model,
            build_pipeline(cfg),
            writer,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            device=device,
            precision=cfg.precision,
            progress=False,
        )
        sync(device)
        closing = time.perf_counter()
    # not in `seconds` (extract() ends with the last commit): consolidation copies every row once more
    out = {
        "images": s.done_now,
        "seconds": s.seconds,
        "images_per_s": s.images_per_s,
        "close_seconds": time.perf_counter() - closing,
    }
    if regions:
        out["res5_regions_per_image"] = sum(regions) / s.done_now
        from gridvqa.data.features import RegionFeatures

        with RegionFeatures(cfg.output) as r:
            out["boxes_per_image"] = float(np.mean([r.num_boxes(i) for i in r.image_ids]))
    return out


def warm_up(model, cfg, items, device: torch.device) -> None:
    """One forward before timing: one-off kernel selection / allocation is not what we measure."""
    group = collate_extraction([ExtractionDataset(items, build_pipeline(cfg))[0]])["groups"][0]
    with torch.inference_mode():
        model(group["images"].to(device), group["sizes"])
    sync(device)


def count_gflops(cfg, items, device: torch.device) -> float:
    """Multiply-adds x2 of one image's forward (torch's FlopCounterMode: convs and matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build_extractor(cfg)
    prepare_model(model, device, bool(cfg.channels_last))
    group = collate_extraction([ExtractionDataset(items, build_pipeline(cfg))[0]])["groups"][0]
    x = group["images"].to(device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, group["sizes"])
    return counter.get_total_flops() / 1e9


def time_backbone(cfg, items, device: torch.device) -> dict:
    """The grid model's backbone alone, on the same batches, already decoded and resized (no I/O)."""
    model, _ = build_extractor(cfg)
    prepare_model(model, device, bool(cfg.channels_last))
    warm_up(model, cfg, items, device)
    ds = ExtractionDataset(items, build_pipeline(cfg))
    batches = [
        collate_extraction([ds[i] for i in b])
        for b in plan_batches(items, ds.pipeline.resize, cfg.batch_size)
    ]
    groups = [g["images"].to(device) for b in batches for g in b["groups"]]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bfloat16" else None
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in groups:
            if autocast is not None:
                with autocast:
                    model.backbone(x)
            else:
                model.backbone(x)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": len(items), "seconds": seconds, "images_per_s": len(items) / seconds}


def time_loader(cfg, items, device: torch.device) -> dict:
    """The extraction's DataLoader alone, batches planned as extract() plans them, no model."""
    pipeline = build_pipeline(cfg)
    batches = plan_batches(items, pipeline.resize, cfg.batch_size)
    loader = extraction_loader(items, pipeline, batches, cfg.num_workers, device)
    images, first, first_images = 0, None, 0
    start = time.perf_counter()
    for batch in loader:  # iter() starts the workers, inside the timed region as in extract()
        images += sum(len(g["index"]) for g in batch["groups"])
        if first is None:
            first, first_images = time.perf_counter() - start, images
    seconds = time.perf_counter() - start
    steady = (images - first_images) / (seconds - first) if first is not None and seconds > first else 0.0
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "startup_seconds": first or 0.0,  # worker start-up + the first batch
        "after_startup_images_per_s": steady,
    }


def time_compute(cfg, items, device: torch.device) -> dict:
    """What the main thread of a grid run does besides writing, on already decoded batches: the copy to
    the device, the forward and each map's copy back in the file's dtype (extraction's own grid_to_host)."""
    model, _ = build_extractor(cfg)
    prepare_model(model, device, bool(cfg.channels_last))
    warm_up(model, cfg, items, device)
    ds = ExtractionDataset(items, build_pipeline(cfg))
    batches = [
        collate_extraction([ds[i] for i in b])
        for b in plan_batches(items, ds.pipeline.resize, cfg.batch_size)
    ]
    pin = device.type == "cuda"  # as the extraction's DataLoader hands them over
    groups = [
        (g["images"].pin_memory() if pin else g["images"], g["sizes"]) for b in batches for g in b["groups"]
    ]
    dtype = PRECISIONS[cfg.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for x, sizes in groups:
            with autocast:
                outs = model(x.to(device, non_blocking=True), sizes)
            for out in outs:
                grid_to_host(out, cfg.dtype)
    seconds = time.perf_counter() - start
    return {"images": len(items), "seconds": seconds, "images_per_s": len(items) / seconds}


def time_writer(grid_file: Path, images: int, commit_images: int, folder: Path) -> dict:
    """The FeatureWriter alone: `images` maps of the grid file's shape and dtype (what grid_to_host hands
    it), committed every `commit_images` and at the end as extract() does; close timed apart."""
    with GridFeatures(grid_file) as r:
        first = r.image_ids[0]
        (h, w), c, dtype = r.grid_shape(first), r.feature_dim, r.dtype
        size = r.get(first)["image_size"]
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((h, w, c), dtype=np.float32).astype(dtype) for _ in range(min(images, 4))]
    add = commit = 0.0
    with FeatureWriter(
        folder / "writer_only.h5", "grid", {"bench": "writer"}, dtype=dtype, overwrite=True
    ) as writer:
        for i in range(images):
            t = time.perf_counter()
            # an automatic commit (the writer's commit_bytes) counts here
            writer.add_grid(i + 1, maps[i % len(maps)], size)
            add += time.perf_counter() - t
            if (i + 1) % commit_images == 0 or i + 1 == images:
                t = time.perf_counter()
                writer.flush()
                commit += time.perf_counter() - t
        closing = time.perf_counter()
    seconds = add + commit
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "add_seconds": add,
        "commit_seconds": commit,
        "close_seconds": time.perf_counter() - closing,
        "grid_shape": [h, w, c],
        "dtype": dtype,
        "megabytes": images * h * w * c * np.dtype(dtype).itemsize / 1e6,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="R-50", choices=list(ARCHS))
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[600, 1000],
        metavar=("SHORT", "MAX"),
        help="shorter side and longer-side cap of the resized images",
    )
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (decoding, resizing)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--res5-dilation",
        type=int,
        default=1,
        choices=[1, 2],
        help="grid: 1 = the paper's output stride 32, 2 = stride 16 (4x the cells and bytes)",
    )
    p.add_argument(
        "--proposals", type=int, nargs="*", default=[1000, 300], help="region rows (none: grid rows only)"
    )
    p.add_argument("--flops", action="store_true", help="also count GFLOPs per image (one more forward each)")
    p.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the grid pipeline's parts: loader, compute, writer (default: on)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return p


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every row (and, unless --no-breakdown, the grid run's parts) on one temporary set of images:
    {"results": {name: row}, "breakdown": {part: row}}."""
    with tempfile.TemporaryDirectory(prefix="bench_extraction_") as tmp:
        folder = Path(tmp)
        make_images(folder, args.images, (min(args.size), max(args.size)))
        items = folder_images(folder, folder / "ids.json")
        grid_cfg = compose_cfg(args, folder, "grid")
        h, w = build_pipeline(grid_cfg).resize.output_size(
            round(min(args.size) * 0.6), round(max(args.size) * 0.6)
        )
        print(
            f"{args.arch}, {args.images} images {w}x{h} (w x h), grid at output stride "
            f"{32 // args.res5_dilation}, batch {args.batch}, {args.precision}, "
            f"device {device} ({_device_name(device)}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            flush=True,
        )
        results = {"backbone": time_backbone(grid_cfg, items, device)}
        _report("backbone", results["backbone"])
        results["grid"] = time_extraction(grid_cfg, items, device)
        _report("grid", results["grid"])
        for n in args.proposals:
            name = f"region@{n}"
            results[name] = time_extraction(compose_cfg(args, folder, "region", n), items, device)
            _report(name, results[name])
        breakdown = {}
        if args.breakdown:
            breakdown["loader"] = time_loader(grid_cfg, items, device)
            breakdown["compute"] = time_compute(grid_cfg, items, device)
            grid_file = Path(grid_cfg.output)
            breakdown["writer"] = time_writer(grid_file, args.images, int(grid_cfg.commit_images), folder)
            print("  where the grid run's time goes (same images and settings):")
            for name, r in breakdown.items():
                _report(name, r, indent=4)
        if args.flops:
            results["grid"]["gflops_per_image"] = count_gflops(grid_cfg, items, device)
            for n in args.proposals:
                cfg = compose_cfg(args, folder, "region", n)
                results[f"region@{n}"]["gflops_per_image"] = count_gflops(cfg, items, device)
    return {"results": results, "breakdown": breakdown}


def print_ratios(args: argparse.Namespace, results: dict[str, dict], breakdown: dict[str, dict]) -> None:
    grid_t = results["grid"]["seconds"] / results["grid"]["images"]
    print("ratios (time per image):")
    for n in args.proposals:
        r = results[f"region@{n}"]
        print(f"  region@{n} / grid   = {r['seconds'] / r['images'] / grid_t:6.1f}x")
    if args.flops:
        g = results["grid"]["gflops_per_image"]
        region = {n: results[f"region@{n}"]["gflops_per_image"] for n in args.proposals}
        text = ", ".join(f"region@{n} {f:.0f} ({f / g:.1f}x)" for n, f in region.items())
        print(f"GFLOPs per image (convs + matmuls): grid {g:.0f}, {text}")
    bare = results["backbone"]["images_per_s"]
    print(f"  grid throughput / bare backbone = {results['grid']['images_per_s'] / bare:5.2f}")
    if breakdown:
        ms = {k: 1000 * r["seconds"] / r["images"] for k, r in breakdown.items()}
        main_ms = ms["compute"] + ms["writer"]
        print(
            f"per image: main thread compute {ms['compute']:.1f} ms + writer {ms['writer']:.1f} ms "
            f"= {main_ms:.1f} ms, loader {ms['loader']:.1f} ms (in its workers, alongside); "
            f"grid run {1000 * grid_t:.1f} ms"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = resolve_device(args.device)
    measured = measure(args, device)
    results, breakdown = measured["results"], measured["breakdown"]
    print_ratios(args, results, breakdown)
    if args.json is not None:
        record = {"args": vars(args) | {"json": str(args.json)}, "results": results}
        if breakdown:  # apart from "results": reports read every row there as an extraction kind
            record["breakdown"] = breakdown
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _report(name: str, r: dict, indent: int = 2) -> None:
    notes = []
    if "res5_regions_per_image" in r:
        regions, boxes = r["res5_regions_per_image"], r["boxes_per_image"]
        notes.append(f"res5 ran on {regions:.0f} regions/image, {boxes:.0f} boxes kept")
    if "startup_seconds" in r:
        notes.append(
            f"first batch after {r['startup_seconds']:.2f} s (worker start-up), "
            f"then {r['after_startup_images_per_s']:.2f} images/s"
        )
    if "add_seconds" in r:
        shape = "x".join(map(str, r["grid_shape"]))
        notes.append(
            f"{shape} {r['dtype']}, {r['megabytes']:.0f} MB: add {r['add_seconds']:.2f} s, "
            f"commit {r['commit_seconds']:.2f} s"
        )
    if "close_seconds" in r:
        notes.append(f"close +{r['close_seconds']:.2f} s, not counted")
    extra = f"  ({'; '.join(notes)})" if notes else ""
    pad = " " * indent
    print(f"{pad}{name:<10} {r['images_per_s']:8.3f} images/s  {r['seconds']:8.2f} s{extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
