"""Grid vs region feature extraction speed, side by side on the same backbone, image size and images.

    python -m gridvqa.benchmarks.extraction --arch R-50 --size 600 1000 --images 6 --device cpu --batch 1
    (scripts/bench_extraction.py takes the same flags)

Rows over the same JPEG files (written to a temp folder, sized so the resize rule gives exactly --size),
each through the real extraction code (DataLoader decoding + resizing, forward, HDF5 writing):
  backbone   the bare backbone forward on the already decoded, resized tensors already on the device (no
             I/O), at the best of --backbone-batches (each batch size's figure is kept in `sweep`)
  grid       grid extraction: res5 map, stride 32 (--res5-dilation 2: 16), written to HDF5; also its rate
             after the loader's start-up (the batches after the first --workers ones), which is what a
             large split sees: start-up is paid once per file
  region@P   bottom-up C4 region extraction with P test-time proposals (default 1000 and 300)
once per --precision (float32, bfloat16 autocast), and, unless --no-breakdown, for the first precision,
where the grid run's time goes (same images and settings):
  loader     the extraction's DataLoader alone (decode, with preprocess=workers resize, collate, pinning
             on a GPU); its first batch waits for the worker start-up, reported apart as startup_seconds
  compute    host->device copy (with preprocess=device, as on a GPU by default, the resize there), grid
             forward and the device->host copy of the batch's maps in the file's dtype, on batches that
             loader handed over beforehand (no loader, no writer)
  writer     the FeatureWriter alone, adding and committing as many maps of the grid file's shape and
             dtype; close (consolidation) is reported apart, as it is for grid and region
The grid row writes as extraction does (writer_thread: a background thread commits while the next batch
runs) and the loader's workers decode ahead, so it can be no faster than the slowest of compute, writer
and loader.
Every row has peak_memory_mb on a GPU (torch.cuda.max_memory_allocated over the row; None on a CPU).
Random weights (timing only). A random detector keeps few boxes above its thresholds, but the C4 head runs
res5 on *every* post-NMS proposal before scoring (as bottom-up's test-time head does), so the per-region cost
is the real one; the script counts the regions res5 actually ran on and prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from gridvqa.benchmarks.common import (
    PeakMemory,
    device_name,
    environment,
    pinned_host_allocs,
    ratio,
    sync,
    timed_row,
    write_json,
)
from gridvqa.config import compose_config
from gridvqa.data.features import FeatureWriter, GridFeatures, RegionFeatures
from gridvqa.devices import resolve_device
from gridvqa.extraction import (
    PRECISIONS,
    ExtractionDataset,
    build_extractor,
    build_pipeline,
    collate_extraction,
    extract,
    extraction_loader,
    folder_images,
    grids_to_host,
    model_input,
    plan_batches,
    prepare_model,
    resolve_preprocess,
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


def compose_cfg(
    args: argparse.Namespace,
    folder: Path,
    kind: str,
    proposals: int = 1000,
    precision: str | None = None,
    extra: Sequence[str] = (),
):
    """conf/extract.yaml as `python -m gridvqa.extract` composes it, set to this benchmark's sizes (then
    --extract-override, then `extra`)."""
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
        f"precision={precision or args.precision[0]}",
        f"region.proposals={proposals}",
        "progress=false",
        *args.extract_override,
        *extra,
    ]
    last = {o.split("=", 1)[0]: i for i, o in enumerate(overrides)}  # Hydra refuses a key given twice
    return compose_config("extract", [o for i, o in enumerate(overrides) if last[o.split("=", 1)[0]] == i])


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class Bench:
    """One benchmark run: its settings, images, device and the models built so far (built once each:
    a random X-152 takes seconds to initialise, and autocast does not change the weights)."""

    args: argparse.Namespace
    device: torch.device
    folder: Path
    items: list
    models: dict[tuple, tuple[Any, dict]] = field(default_factory=dict)
    decoded: list[dict] = field(default_factory=list)  # ExtractionDataset items, in order

    def cfg(
        self,
        kind: str,
        precision: str,
        proposals: int = 1000,
        batch: int | None = None,
        extra: Sequence[str] = (),
    ):
        cfg = compose_cfg(self.args, self.folder, kind, proposals, precision, extra)
        if batch is not None:
            cfg.batch_size = batch
        return cfg

    def model(self, cfg) -> tuple[Any, dict]:
        """The extractor cfg describes, moved to the device and set up as extraction's run() does."""
        opts = model_options(cfg)
        proposals = int(cfg.region.proposals) if cfg.kind == "region" else 0
        key = (str(cfg.kind), proposals, bool(cfg.channels_last), tuple(sorted(opts.items())))
        if key not in self.models:
            model, prov = build_extractor(cfg)
            prepare_model(model, self.device, bool(cfg.channels_last), **opts)
            self.models[key] = (model, prov)
        if self.device.type != "cpu":
            # a row's peak memory counts the weights on the device: only this row's model waits there
            for other, (m, _) in self.models.items():
                if other != key:
                    m.to("cpu")
            self.models[key][0].to(self.device)
        return self.models[key]

    def batches(self, cfg, n: int | None = None, pin: bool = False) -> list[tuple[torch.Tensor, list]]:
        """The batches extract() forms from the first n images (default all), decoded and resized up front
        as its workers do with preprocess=workers: (images, sizes) per padded shape, on the device or, with
        `pin`, in pinned host memory. Every row uses the same files and resize: each is decoded once."""
        ds = ExtractionDataset(self.items, build_pipeline(cfg))
        for i in range(len(self.decoded), len(self.items) if n is None else n):
            self.decoded.append(ds[i])
        items = self.items if n is None else self.items[:n]
        out = []
        for b in plan_batches(items, ds.pipeline.resize, int(cfg.batch_size)):
            for g in collate_extraction([self.decoded[i] for i in b])["groups"]:
                x = g["images"].pin_memory() if pin else g["images"].to(self.device)
                out.append((x, g["sizes"]))
        return out

    def loop_options(self, cfg) -> dict[str, Any]:
        """extract()'s keywords that conf/extract.yaml sets beyond the sizes (where the config has them)."""
        preprocess = cfg.get("preprocess")
        if preprocess is None:
            return {}
        return {"preprocess": resolve_preprocess(str(preprocess), self.device)}


def model_options(cfg) -> dict[str, bool]:
    """prepare_model()'s keywords that conf/extract.yaml sets (torch.compile, cudnn's algorithm search,
    BN folding)."""
    return {k: bool(cfg[k]) for k in ("compile", "cudnn_benchmark", "fold_bn") if cfg.get(k) is not None}


def warm_up(model, cfg, batches: Sequence[tuple[torch.Tensor, list]], device: torch.device) -> None:
    """One forward per distinct input shape before timing: cudnn's algorithm search (benchmark mode) and
    one-off allocations happen on the first batch of each shape, and are not what we measure."""
    seen = set()
    with torch.inference_mode(), autocast_for(str(cfg.precision), device):
        for x, sizes in batches:
            if tuple(x.shape) not in seen:
                seen.add(tuple(x.shape))
                model(x.to(device), sizes)
    sync(device)


def time_backbone(bench: Bench, precision: str, batch: int, fold_bn: bool | None = None) -> dict:
    """The grid model's backbone alone on batches already decoded, resized and on the device (no I/O);
    `fold_bn` overrides the config's BN folding."""
    cfg = bench.cfg("grid", precision, batch=batch)
    if fold_bn is not None:
        cfg.fold_bn = fold_bn
    model, _ = bench.model(cfg)
    batches = bench.batches(cfg)
    warm_up(model, cfg, batches, bench.device)
    with torch.inference_mode(), timed_row(bench.device, len(bench.items)) as row:
        for x, _ in batches:
            with autocast_for(precision, bench.device):
                model.backbone(x)
    row["batch"] = batch
    return row


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 convolutions and matmuls without TF32 tensor cores, restored on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def backbone_sweep(bench: Bench, precision: str) -> dict:
    """The bare backbone at each of --backbone-batches; the row is the fastest, with every figure."""
    rows = {b: time_backbone(bench, precision, b) for b in bench.args.backbone_batches}
    best = max(rows.values(), key=lambda r: r["images_per_s"])
    return best | {"sweep": {str(b): r["images_per_s"] for b, r in rows.items()}}


def time_extraction(bench: Bench, cfg) -> dict:
    """One extraction run into a fresh HDF5 file; regions counted at the input of res5."""
    model, prov = bench.model(cfg)
    # a full batch and, when the last one is shorter, one of its size: the shapes the run will see
    n, batch = len(bench.items), int(cfg.batch_size)
    for k in {min(n, batch), n % batch} - {0}:
        warm_up(model, cfg, bench.batches(cfg, k), bench.device)
    regions: list[int] = []
    hook = None
    if model.kind == "region":
        hook = model.detector.backbone.res5.register_forward_pre_hook(
            lambda m, a: regions.append(a[0].shape[0])
        )
    done_at: list[tuple[float, int]] = []  # (time, images so far) after each batch
    try:
        with (
            PeakMemory(bench.device) as peak,
            pinned_host_allocs(bench.device) as pinned,
            FeatureWriter(cfg.output, model.kind, prov, dtype=cfg.dtype, overwrite=True,
                          background=bool(cfg.get("writer_thread", True))) as writer,
        ):
            s = extract(
                bench.items, model, build_pipeline(cfg), writer,
                batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers), device=bench.device,
                precision=str(cfg.precision), commit_images=int(cfg.commit_images), progress=False,
                on_batch=lambda n: done_at.append((time.perf_counter(), n)), **bench.loop_options(cfg),
            )  # fmt: skip
            sync(bench.device)
            closing = time.perf_counter()
    finally:
        if hook is not None:
            hook.remove()
    # not in `seconds` (extract() ends with the last commit): consolidation copies every row once more
    out = {
        "images": s.done_now,
        "seconds": s.seconds,
        "images_per_s": s.images_per_s,
        "close_seconds": time.perf_counter() - closing,
        "peak_memory_mb": peak.mb,
    }
    out |= pinned | _after_startup(done_at, int(cfg.num_workers))
    if regions:
        out["res5_regions_per_image"] = sum(regions) / s.done_now
        with RegionFeatures(cfg.output) as r:
            out["boxes_per_image"] = float(np.mean([r.num_boxes(i) for i in r.image_ids]))
    return out


def profile_extraction(bench: Bench, cfg, top: int = 12) -> dict[str, Any]:
    """One more grid run under torch.profiler (slower than the timed one: not a timing row): how much of
    the run the device was busy, and where the host and device time went (self time per op / kernel)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if bench.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        row = time_extraction(bench, cfg)
        wall = time.perf_counter() - start
    events = prof.key_averages()

    def device_us(e: Any) -> float:  # the attribute's name changed across torch versions
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    def table(key: Callable[[Any], float]) -> list[list[Any]]:
        ranked = sorted((e for e in events if key(e) > 0), key=key, reverse=True)[:top]
        return [[e.key, round(key(e) / 1000, 2), int(e.count)] for e in ranked]

    # kernels, copies and memsets are the device's own events (ops on the host carry no self device time)
    busy = sum(device_us(e) for e in events if e.device_type == DeviceType.CUDA)
    out = {
        "images": row["images"],
        "wall_seconds": wall,
        "host_top_ms": table(lambda e: float(e.self_cpu_time_total)),
    }
    if bench.device.type == "cuda":
        out["device_busy_seconds"] = busy / 1e6
        out["device_busy_fraction"] = busy / 1e6 / wall if wall > 0 else None
        out["device_top_ms"] = table(device_us)
    return out


def _print_profile(p: dict[str, Any]) -> None:
    busy = p.get("device_busy_fraction")
    busy_text = f", device busy {busy:.0%} of it" if busy is not None else ""
    print(f"  profiled grid run (not a timing row): {p['wall_seconds']:.2f} s{busy_text}")
    for title, key in (("host, self time", "host_top_ms"), ("device kernels", "device_top_ms")):
        if key in p:
            print(f"    {title}: " + "; ".join(f"{n} {ms:.1f} ms x{c}" for n, ms, c in p[key][:6]))


def _after_startup(done_at: list[tuple[float, int]], workers: int) -> dict:
    """The rate over the batches after the first max(1, workers): each worker's first batch waits for its
    start-up, and they arrive together; after them the batches come at the pipeline's own pace."""
    skip = max(1, workers)
    if len(done_at) <= skip:
        return {}
    t0 = done_at[skip - 1][0]
    images = sum(n for _, n in done_at[skip:])
    seconds = done_at[-1][0] - t0
    return {
        "after_startup_images": images,
        "after_startup_images_per_s": images / seconds if seconds else 0.0,
    }


def count_gflops(bench: Bench, cfg) -> float:
    """Multiply-adds x2 of one image's forward (torch's FlopCounterMode: convs and matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = bench.model(cfg)
    x, sizes = bench.batches(cfg, 1)[0]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, sizes)
    return counter.get_total_flops() / 1e9


def time_loader(bench: Bench, cfg) -> dict:
    """The extraction's DataLoader alone, batches planned as extract() plans them, no model (with
    preprocess=device its workers only decode: the resize is then the device's, not timed here)."""
    items, pipeline = bench.items, build_pipeline(cfg)
    batches = plan_batches(items, pipeline.resize, cfg.batch_size)
    loader = extraction_loader(
        items, pipeline, batches, cfg.num_workers, bench.device, **bench.loop_options(cfg)
    )
    images, first, first_images = 0, None, 0
    start = time.perf_counter()
    with pinned_host_allocs(bench.device) as pinned:
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
        "peak_memory_mb": None,  # no device work
    } | pinned


def time_compute(bench: Bench, cfg) -> dict:
    """What the main thread of a grid run does besides writing, on batches the extraction's own loader
    handed over beforehand (pinned on a GPU): model_input (the copy to the device, and with
    preprocess=device the resize and normalisation there), the forward and grids_to_host, as a batch
    of extract() runs them."""
    model, _ = bench.model(cfg)
    items, pipeline = bench.items, build_pipeline(cfg)
    plan = plan_batches(items, pipeline.resize, cfg.batch_size)
    loader = extraction_loader(items, pipeline, plan, 0, bench.device, **bench.loop_options(cfg))
    groups = [g for batch in loader for g in batch["groups"]]
    warm_up(model, cfg, bench.batches(cfg), bench.device)
    with torch.inference_mode(), timed_row(bench.device, sum(len(g["index"]) for g in groups)) as row:
        for g in groups:
            x = model_input(g, pipeline, bench.device)
            with autocast_for(str(cfg.precision), bench.device):
                outs = model(x, g["sizes"])
            grids_to_host(outs, cfg.dtype)
    return row


MEMORY_DIR = Path("/dev/shm")  # a RAM-backed folder on Linux


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
        "peak_memory_mb": None,  # no device work
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
    p.add_argument("--batch", type=int, default=1, help="images per batch of the extraction rows")
    p.add_argument(
        "--backbone-batches",
        type=int,
        nargs="+",
        default=None,
        metavar="B",
        help="batch sizes the bare backbone is timed at; its row is the fastest (default: --batch)",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (decoding, resizing)")
    p.add_argument(
        "--precision",
        nargs="+",
        default=["float32"],
        choices=list(PRECISIONS),
        help="every row once per precision (bfloat16: autocast); the first fills `results`",
    )
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
    p.add_argument(
        "--extract-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides of conf/extract.yaml for every row (e.g. channels_last=false)",
    )
    p.add_argument(
        "--grid-variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also time the grid row with these overrides of conf/extract.yaml, at the first precision "
        "(repeatable; e.g. writer_thread=false, num_workers=12): which setting the pipeline waits on",
    )
    p.add_argument("--flops", action="store_true", help="also count GFLOPs per image (one more forward each)")
    p.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the grid pipeline's parts: loader, compute, writer (default: on)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more grid run under torch.profiler at the first precision: device busy time, top ops",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.images < 1 or args.batch < 1 or args.workers < 0:
        p.error("--images and --batch must be >= 1, --workers >= 0")
    args.backbone_batches = sorted(set(args.backbone_batches or [args.batch]))
    if args.backbone_batches[0] < 1:
        p.error("--backbone-batches must be >= 1")
    args.precision = list(dict.fromkeys(args.precision))  # each once, in the order given
    return args


def measure_precision(bench: Bench, precision: str, breakdown: bool) -> dict[str, Any]:
    """Every row at one precision: {"results": {name: row}} (+ "breakdown" when asked)."""
    args = bench.args
    results = {"backbone": backbone_sweep(bench, precision)}
    _report("backbone", results["backbone"])
    grid_cfg = bench.cfg("grid", precision)
    results["grid"] = time_extraction(bench, grid_cfg)
    _report("grid", results["grid"])
    for n in args.proposals:
        name = f"region@{n}"
        results[name] = time_extraction(bench, bench.cfg("region", precision, n))
        _report(name, results[name])
    out: dict[str, Any] = {"results": results}
    if breakdown:
        parts = {
            "loader": time_loader(bench, grid_cfg),
            "compute": time_compute(bench, grid_cfg),
            "writer": time_writer(
                Path(grid_cfg.output), args.images, int(grid_cfg.commit_images), bench.folder
            ),
        }
        if MEMORY_DIR.is_dir():  # the same writer into RAM (tmpfs): what the disk costs it
            with tempfile.TemporaryDirectory(prefix="bench_writer_", dir=MEMORY_DIR) as tmp:
                parts["writer_in_memory"] = time_writer(
                    Path(grid_cfg.output), args.images, int(grid_cfg.commit_images), Path(tmp)
                )
        print("  where the grid run's time goes (same images and settings):")
        for name, r in parts.items():
            _report(name.replace("_", " "), r, indent=4)
        if grid_cfg.get("fold_bn"):  # what folding the BNs buys: the bare backbone without it
            parts["backbone_bn_unfolded"] = time_backbone(
                bench, precision, int(results["backbone"]["batch"]), fold_bn=False
            )
            _report("backbone, BN not folded", parts["backbone_bn_unfolded"])
        if bench.device.type == "cuda" and precision == "float32":
            # float32 rows run their convolutions on TF32 tensor cores (torch's default): bfloat16 can gain
            # at most what TF32 leaves; this row is float32 arithmetic proper, for comparison
            with no_tf32():
                parts["backbone_no_tf32"] = time_backbone(bench, precision, int(results["backbone"]["batch"]))
            _report("backbone, TF32 off", parts["backbone_no_tf32"])
        out["breakdown"] = parts
    if args.grid_variant and breakdown:
        print("  the grid row with other settings (same images):")
        out["grid_variants"] = {}
        for variant in args.grid_variant:
            row = time_extraction(bench, bench.cfg("grid", precision, extra=variant.split(",")))
            out["grid_variants"][variant] = row
            _report(f"grid, {variant}", row, indent=4)
    if args.profile and breakdown:
        out["profile"] = profile_extraction(bench, grid_cfg)
        _print_profile(out["profile"])
    if args.flops:
        results["grid"]["gflops_per_image"] = count_gflops(bench, grid_cfg)
        for n in args.proposals:
            results[f"region@{n}"]["gflops_per_image"] = count_gflops(
                bench, bench.cfg("region", precision, n)
            )
    return out


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every row at every precision on one temporary set of images: {"results", "breakdown"} for the
    first precision (the rows reports read) and {"precisions": {precision: {"results", ...}}}."""
    with tempfile.TemporaryDirectory(prefix="bench_extraction_") as tmp:
        folder = Path(tmp)
        make_images(folder, args.images, (min(args.size), max(args.size)))
        bench = Bench(args, device, folder, folder_images(folder, folder / "ids.json"))
        h, w = build_pipeline(bench.cfg("grid", args.precision[0])).resize.output_size(
            round(min(args.size) * 0.6), round(max(args.size) * 0.6)
        )
        print(
            f"{args.arch}, {args.images} images {w}x{h} (w x h), grid at output stride "
            f"{32 // args.res5_dilation}, batch {args.batch} (backbone: best of "
            f"{', '.join(map(str, args.backbone_batches))}), {args.workers} workers, "
            f"device {device} ({device_name(device)}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            flush=True,
        )
        grid_cfg = bench.cfg("grid", args.precision[0])
        options = {"channels_last": bool(grid_cfg.channels_last), **model_options(grid_cfg)}
        options |= bench.loop_options(grid_cfg)
        print("extraction options: " + ", ".join(f"{k}={v}" for k, v in options.items()), flush=True)
        precisions = {}
        for i, precision in enumerate(args.precision):
            print(f"{precision}:", flush=True)
            precisions[precision] = measure_precision(bench, precision, args.breakdown and i == 0)
    first = precisions[args.precision[0]]
    return {
        "results": first["results"],
        "breakdown": first.get("breakdown", {}),
        "profile": first.get("profile"),
        "grid_variants": first.get("grid_variants"),
        "precisions": precisions,
        "options": options,
    }


def ratios(record: dict[str, Any]) -> dict[str, Any]:
    """The figures the goals are about, per precision, and each row's bfloat16 / float32 throughput."""
    out: dict[str, Any] = {}
    precisions = record.get("precisions") or {"float32": {"results": record["results"]}}
    for precision, p in precisions.items():
        res = p["results"]
        grid, bare = res["grid"], res["backbone"]["images_per_s"]
        r = {
            "grid_over_backbone": ratio(grid["images_per_s"], bare),
            "grid_after_startup_over_backbone": ratio(grid.get("after_startup_images_per_s"), bare),
        }
        grid_t = grid["seconds"] / grid["images"]
        for name, row in res.items():
            if name.startswith("region@"):
                r[f"{name}_over_grid"] = (row["seconds"] / row["images"]) / grid_t
        out[precision] = r
    unfolded = (record.get("breakdown") or {}).get("backbone_bn_unfolded")
    if unfolded is not None:
        out["bn_folding_speedup"] = ratio(record["results"]["backbone"]["images_per_s"],
                                          unfolded["images_per_s"])
    if "float32" in precisions and "bfloat16" in precisions:
        fp32, bf16 = precisions["float32"]["results"], precisions["bfloat16"]["results"]
        out["bfloat16_over_float32"] = {
            name: ratio(bf16[name]["images_per_s"], fp32[name]["images_per_s"])
            for name in fp32
            if name in bf16
        }
        strict = (record.get("breakdown") or {}).get("backbone_no_tf32")
        if strict is not None:
            out["bfloat16_over_float32_no_tf32"] = ratio(bf16["backbone"]["images_per_s"],
                                                         strict["images_per_s"])
    return out


def print_ratios(args: argparse.Namespace, record: dict[str, Any]) -> None:
    results, breakdown, r = record["results"], record.get("breakdown") or {}, record["ratios"]
    for precision in args.precision:
        p = r[precision]
        print(f"ratios, {precision} (time per image):")
        for n in args.proposals:
            print(f"  region@{n} / grid   = {p[f'region@{n}_over_grid']:6.1f}x")
        after = p["grid_after_startup_over_backbone"]
        after_text = f", after the loader's start-up {after:5.2f}" if after is not None else ""
        print(f"  grid throughput / bare backbone = {p['grid_over_backbone']:5.2f}{after_text}")
    if "bfloat16_over_float32" in r:
        text = ", ".join(f"{k} {v:.2f}x" for k, v in r["bfloat16_over_float32"].items() if v is not None)
        print(f"bfloat16 / float32 throughput: {text}")
        if r.get("bfloat16_over_float32_no_tf32") is not None:
            strict = r["bfloat16_over_float32_no_tf32"]
            print(f"bfloat16 / float32 with TF32 off, bare backbone: {strict:.2f}x")
    if args.flops:
        g = results["grid"]["gflops_per_image"]
        region = {n: results[f"region@{n}"]["gflops_per_image"] for n in args.proposals}
        text = ", ".join(f"region@{n} {f:.0f} ({f / g:.1f}x)" for n, f in region.items())
        print(f"GFLOPs per image (convs + matmuls): grid {g:.0f}, {text}")
    if breakdown:
        grid_t = results["grid"]["seconds"] / results["grid"]["images"]
        ms = {k: 1000 * row["seconds"] / row["images"] for k, row in breakdown.items()}
        if r.get("bn_folding_speedup") is not None:
            print(f"BN folding: bare backbone {r['bn_folding_speedup']:.2f}x the throughput without it "
                  f"({ms['backbone_bn_unfolded']:.1f} ms per image unfolded)")
        in_ram = f" ({ms['writer_in_memory']:.1f} ms into RAM)" if "writer_in_memory" in ms else ""
        print(
            f"per image: compute {ms['compute']:.1f} ms (main thread), writer {ms['writer']:.1f} ms (its own "
            f"thread){in_ram}, loader {ms['loader']:.1f} ms (its workers), side by side; "
            f"grid run {1000 * grid_t:.1f} ms"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, print and (with --json) write; returns the record."""
    device = resolve_device(args.device)
    measured = measure(args, device)
    record: dict[str, Any] = {
        "args": vars(args) | {"json": str(args.json)},
        "environment": environment(device),
        "options": measured["options"],
        "results": measured["results"],
    }
    if measured["breakdown"]:  # apart from "results": reports read every row there as an extraction kind
        record["breakdown"] = measured["breakdown"]
    if measured["profile"]:
        record["profile"] = measured["profile"]
    if measured["grid_variants"]:  # apart from "results", as the breakdown: not an extraction kind
        record["grid_variants"] = measured["grid_variants"]
    record["precisions"] = measured["precisions"]
    record["ratios"] = ratios(record)
    print_ratios(args, record)
    if args.json is not None:
        write_json(args.json, record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


def _report(name: str, r: dict, indent: int = 2) -> None:
    notes = []
    if "sweep" in r:
        notes.append("batch " + ", ".join(f"{b}: {v:.2f}" for b, v in r["sweep"].items()) + " images/s")
    if "res5_regions_per_image" in r:
        regions, boxes = r["res5_regions_per_image"], r["boxes_per_image"]
        notes.append(f"res5 ran on {regions:.0f} regions/image, {boxes:.0f} boxes kept")
    if "startup_seconds" in r:
        notes.append(
            f"first batch after {r['startup_seconds']:.2f} s (worker start-up), "
            f"then {r['after_startup_images_per_s']:.2f} images/s"
        )
    elif "after_startup_images_per_s" in r:
        notes.append(f"after the loader's start-up {r['after_startup_images_per_s']:.2f} images/s")
    if "add_seconds" in r:
        shape = "x".join(map(str, r["grid_shape"]))
        notes.append(
            f"{shape} {r['dtype']}, {r['megabytes']:.0f} MB: add {r['add_seconds']:.2f} s, "
            f"commit {r['commit_seconds']:.2f} s"
        )
    if "close_seconds" in r:
        notes.append(f"close +{r['close_seconds']:.2f} s, not counted")
    if r.get("pinned_allocs"):
        seconds = r.get("pinned_alloc_seconds", 0.0)
        notes.append(f"{r['pinned_allocs']:.0f} new pinned host blocks, {seconds:.2f} s page-locking")
    if r.get("peak_memory_mb") is not None:
        notes.append(f"peak {r['peak_memory_mb']:.0f} MiB")
    extra = f"  ({'; '.join(notes)})" if notes else ""
    pad = " " * indent
    print(f"{pad}{name:<10} {r['images_per_s']:8.3f} images/s  {r['seconds']:8.2f} s{extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
