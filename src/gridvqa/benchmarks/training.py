"""End-to-end training step vs its parts, and the data loader vs the step, side by side in one run.

    python -m gridvqa.benchmarks.training [--preset paper_r50_448 | e2e] [--make-data | --data-root DIR]
        [--precision 32-true bf16-mixed] [--batches 10] [--repeats 5] [--device cpu|cuda] [--quick]
    (scripts/bench_train.py takes the same flags)

The real configuration of `python -m gridvqa.train` (composed by Hydra, built by hydra.utils.instantiate):
  paper_r50_448  experiment=paper_e2e_x101_448 with the R-50 backbone: 448x448, MCAN small, the paper
                 files' batch (64 questions, each with its own image), FrozenBN, freeze_at 2, gradient
                 checkpointing, channels_last (the default preset)
  e2e            experiment=e2e, the CPU-sized main job
on N real batches of its train loader, pre-loaded onto the device for the compute timings:
  (a) the training step as Lightning runs it: a real `pl.Trainer` fit over the pre-loaded batches, one epoch
      per measurement (forward, loss, logging, backward, gradient clipping, AdamW, LR scheduler, loop code)
  (b) the backbone alone: forward + backward on the same images
  (c) the head alone: forward + loss + backward on the same visual features (detached from the backbone but
      requiring grad, so the head's backward also makes the gradient the step hands to the backbone)
  (a) also holds, timed alone beside it: the optimizer (clip + step + zero_grad) and the pixels' resize /
      normalisation on the device (data.resize_on_device / data.normalize_on_device), if any
  (d) the data loader alone: a fresh train loader with the configured workers, no compute; its rate after
      the workers' start-up (the batches after the first `workers` ones) is what a run sees, start-up
      being paid once (persistent workers)
once per --precision (32-true, bf16-mixed: autocast), with the peak device memory of (a), (b) and (c)
((c)'s includes the visual features of all N batches, made before its timer starts). (b) and (c) sync
the device only at the ends of a pass, as the fit does; the optimizer part syncs around each batch.
Goals: (a)'s images/s >= 0.85 x those of (b + c); (d)'s >= 2 x (a)'s; bf16-mixed >= 1.8 x 32-true.
A miss is printed, not an error (exit 0).

(b), (c) and the optimizer alone run inside the fit, after each epoch (a timing callback), so that every
measurement of each kind sits next to one of the others: load swings on a shared machine hit them alike.
The first epoch of each kind is warm-up; the figures are medians over --repeats.
Without the pre-trained backbone the weights are random: timing is all we need.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gridvqa.benchmarks.common import PeakMemory, environment, ratio, sync, write_json
from gridvqa.config import compose_config
from gridvqa.data import layout

STEP_GOAL = 0.85  # (a)'s images/s / (b + c)'s images/s at least
LOADER_GOAL = 2.0  # (d)'s images/s / (a)'s at least
BF16_GOAL = 1.8  # bf16-mixed step images/s / 32-true's at least
PRECISIONS = ("32-true", "bf16-mixed")

PRESETS: dict[str, list[str]] = {
    # the paper's end-to-end recipe (MCAN small, 64 questions a step) on R-50 at 448x448; random
    # weights and word vectors (timing only: the X-101 weights path and GloVe file are not needed)
    "paper_r50_448": [
        "experiment=paper_e2e_x101_448",
        "backbone=r50",
        "backbone.stride_in_1x1=true",
        "backbone.weights=null",
        "model.head.glove_path=null",
    ],
    "e2e": ["experiment=e2e"],
}
# images of the generated set (--make-data): COCO's sizes for the paper preset, the built-in set's else
DATA_SIDES = {"paper_r50_448": (480, 640), "e2e": (160, 320)}
QUICK_SIDES = (64, 96)
QUICK = {"batches": 2, "repeats": 1, "image_size": 64, "num_workers": 1, "threads": 1}
# --quick's model: the same code at its smallest (R-tiny, MCAN tiny), two images a batch
QUICK_OVERRIDES = [
    "backbone=r_tiny",
    "backbone.stride_in_1x1=false",
    "model.head.size=tiny",
    "data.batch_size=2",
]
FULL = {"batches": 10, "repeats": 5}


def compose_cfg(overrides: list[str], output_dir: Path):
    """The config `python -m gridvqa.train` would see (hydra node dropped, its runtime dir set)."""
    return compose_config("train", overrides, output_dir=output_dir)


def has_data(root: Path) -> bool:
    return all(
        p.is_file()
        for p in (
            layout.questions_path(root, "train"),
            layout.answers_path(root),
            layout.tokenizer_dir(root) / "tokenizer.json",
        )
    )


def make_data(root: Path, train_images: int, sides: tuple[int, int], questions_per_image: int = 5) -> None:
    """A built-in set (train split + answers + tokenizer) for timing only."""
    from gridvqa.data.prepare import prepare
    from gridvqa.data.synthetic import generate

    generate(
        root,
        train_images=train_images,
        val_images=4,
        test_images=0,
        seed=0,
        questions_per_image=questions_per_image,
        min_side=sides[0],
        max_side=sides[1],
    )
    prepare(root, min_count=1)  # a few images: keep every answer so the head has a real classifier


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The autocast Lightning's precision setting implies, for the passes run outside its loop."""
    p = str(precision)
    if p.startswith("bf16") and "mixed" in p:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if p.startswith("16") and "mixed" in p:
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    return nullcontext


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def take(loader: Iterable, n: int) -> tuple[list, list[float]]:
    """Up to n non-empty batches from a fresh iterator, and the seconds from iter() to each batch."""
    start = time.perf_counter()
    it = iter(loader)
    out, times = [], []
    for b in islice(it, n):
        times.append(time.perf_counter() - start)
        if b is not None:
            out.append(b)
    del it  # the workers stop with the iterator (persistent ones once the caller drops the loader too)
    return out, times


def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # as VQAModule.training_step: BCE on soft scores, summed over answers, averaged over questions
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / logits.shape[0]


class Passes:
    """Timed passes over the pre-loaded batches of each kind: seconds per pass and the peak device memory
    of each kind (MiB, None off CUDA)."""

    KINDS = ("step", "backbone", "head", "optimizer", "pixels")

    def __init__(self, module, batches: list[dict], device: torch.device, precision: str) -> None:
        self.module, self.batches, self.device = module, batches, device
        self.autocast = autocast_for(precision, device)
        # Inputs each pass starts from, made once and outside the timers (normalised, channels_last).
        with torch.no_grad():
            self.images = [module.pixels(b) for b in batches]
        self.feature = module.hparams.backbone_feature
        self.times: dict[str, list[float]] = {k: [] for k in self.KINDS}
        self.peak_mb: dict[str, float | None] = dict.fromkeys(self.KINDS)

    def sync(self) -> None:
        sync(self.device)

    def _timed(self, fn: Callable[[], None]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def _timed_loop(self, fn: Callable[[Any], None], items: Sequence[Any]) -> float:
        """One pass over items with a sync only at its ends, as the fit runs its batches: a sync per
        batch would idle the device while the host queues the next one and flatter step / (b + c)."""
        self.sync()
        t = time.perf_counter()
        for item in items:
            fn(item)
        self.sync()
        return time.perf_counter() - t

    def _record(self, kind: str, seconds: float, peak: PeakMemory) -> None:
        self.times[kind].append(seconds)
        if peak.mb is not None:
            self.peak_mb[kind] = max(self.peak_mb[kind] or 0.0, peak.mb)

    def backbone(self) -> None:
        m = self.module

        def run(x: torch.Tensor) -> None:
            m.zero_grad(set_to_none=True)
            with self.autocast():
                feats = m.backbone(x)[self.feature]
            if feats.requires_grad:  # a frozen backbone (an override) has no backward to time
                feats.float().sum().backward()

        with PeakMemory(self.device) as peak:
            total = self._timed_loop(run, self.images)
        self._record("backbone", total, peak)

    def head(self) -> None:
        m = self.module
        with PeakMemory(self.device) as peak:
            inputs = []  # the visual features of every batch, made before the timer starts
            for b in self.batches:
                with torch.no_grad(), self.autocast():
                    feats, mask, _ = m.visual_inputs(b)
                inputs.append((b, feats.detach().requires_grad_(True), mask))

            def run(item: tuple[dict, torch.Tensor, torch.Tensor]) -> None:
                b, feats, mask = item
                m.zero_grad(set_to_none=True)
                idx = b["img_index"]  # each question takes its image's features, as VQAModule.forward
                with self.autocast():
                    logits = m.head(b["q_ids"], b["q_mask"], feats[idx], mask[idx])
                loss_of(logits, b["target"]).backward()

            total = self._timed_loop(run, inputs)
            del inputs
        self._record("head", total, peak)

    def pixels(self) -> None:
        """The batch's pixels to the backbone's input alone: resize (data.resize_on_device) and
        normalise (data.normalize_on_device) on the device, or nothing for a float batch."""
        with PeakMemory(self.device) as peak, torch.no_grad():
            total = self._timed_loop(self.module.pixels, self.batches)
        self._record("pixels", total, peak)

    def optimizer(self, trainer) -> None:
        """Gradient clipping + optimizer step + zero_grad, on the gradients of a real step (made untimed,
        so this part syncs around each batch)."""
        m, opt, total = self.module, trainer.optimizers[0], 0.0
        clip_val, clip_algo = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        with PeakMemory(self.device) as peak:
            for b in self.batches:
                m.zero_grad(set_to_none=True)
                with self.autocast():
                    logits = m(b)
                loss_of(logits, b["target"]).backward()

                def run() -> None:
                    if clip_val:
                        m.clip_gradients(opt, gradient_clip_val=clip_val, gradient_clip_algorithm=clip_algo)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                total += self._timed(run)
        self._record("optimizer", total, peak)


def make_timer(passes: Passes):
    import pytorch_lightning as pl

    class EpochTimer(pl.Callback):
        """Times each training epoch (= one pass over the pre-loaded batches), then runs the other passes."""

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.peak = PeakMemory(passes.device).__enter__()
            passes.sync()
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            passes.sync()
            seconds = time.perf_counter() - self.t0
            self.peak.__exit__(None, None, None)
            passes._record("step", seconds, self.peak)
            with torch.enable_grad():
                passes.backbone()
                passes.head()
                passes.optimizer(trainer)
                passes.pixels()
            pl_module.zero_grad(set_to_none=True)

    return EpochTimer()


def fit_passes(cfg, module, passes: Passes, repeats: int, workdir: Path, device: torch.device) -> None:
    """1 + repeats epochs of a real Trainer (configured one, minus logging/checkpoints/validation)."""
    import hydra
    from omegaconf import open_dict
    from torch.utils.data import DataLoader

    with open_dict(cfg):
        cfg.trainer.update(
            max_epochs=1 + repeats,
            min_epochs=None,
            max_steps=-1,
            max_time=None,
            limit_train_batches=None,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            fast_dev_run=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(workdir),
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
        )
        cfg.trainer.pop("val_check_interval", None)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[make_timer(passes)], logger=False)
    # Already-collated batches: the loader hands them over as they are.
    loader = DataLoader(passes.batches, batch_size=None, shuffle=False, collate_fn=_same)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*(num_workers|val_dataloader|validation_step|does not have|LeafSpec).*"
        )
        trainer.fit(module, train_dataloaders=loader)


def _same(batch):
    return batch


def loader_figures(datamodule, n: int, repeats: int, workers: int, pin: bool = False) -> dict[str, Any]:
    """Fresh train loaders (configured workers, shuffled) over n batches, nothing else running: images/s
    over the whole pass (worker start-up included) and after the first max(1, workers) batches. `pin`:
    page-locked batches, as a fit on a GPU gets them (the datamodule pins only under a GPU trainer)."""
    totals, steady, firsts, images = [], [], [], 0
    skip = max(1, workers)
    for _ in range(repeats):
        loader = datamodule.train_dataloader()
        loader.pin_memory = pin
        got, times = take(loader, n)
        sizes = [len(b["orig_size"]) for b in got]
        images = sum(sizes)
        totals.append(images / times[-1])
        firsts.append(times[0])
        if len(times) > skip and times[-1] > times[skip - 1]:
            steady.append(sum(sizes[skip:]) / (times[-1] - times[skip - 1]))
        del loader, got
        gc.collect()
    return {
        "batches": len(sizes),
        "images": images,
        "workers": workers,
        "images_per_s": median(totals),
        "after_startup_images_per_s": median(steady) if steady else None,
        "startup_seconds": median(firsts),
        "raw_images_per_s": totals,
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="paper_r50_448", help="see the module help")
    p.add_argument(
        "--data-root", type=Path, default=None, help="VQA data root (default: the config's, data/shapes)"
    )
    p.add_argument(
        "--make-data",
        action="store_true",
        help="generate a built-in set sized for this run in a temp dir, instead of reading a data root",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=None,
        help="Lightning precisions to time, each with its own module (default: the config's)",
    )
    p.add_argument("--batches", type=int, default=None, help="batches per measured pass (N; default 10)")
    p.add_argument("--loader-batches", type=int, default=None, help="batches per loader pass (default: N, "
                   "at least 3 x workers + 2 so the rate after start-up is measured)")  # fmt: skip
    p.add_argument(
        "--repeats", type=int, default=None, help="measured passes per kind after one warm-up (default 5)"
    )
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the config's)")
    p.add_argument("--more-workers", type=int, default=None,
                   help="also time the loader alone with this many workers (not judged)")
    p.add_argument("--compare-resize", action="store_true",
                   help="also time the loader alone with the other data.resize_on_device (not judged)")
    p.add_argument("--loader-only", action="store_true",
                   help="time the data loader rows alone (no model: the loader's side on any machine)")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: the config's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU, seconds): " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items()) + ", generated data")  # fmt: skip
    p.add_argument(
        "--override", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for compose"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    _fill_defaults(args)
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    """Sizes left unset: --quick's tiny ones (on a generated set), else the full run's."""
    if args.quick:
        args.make_data = True
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a busy CPU, fewer threads than cores can be much faster
    try:
        return 0 if run(args) is not None else 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (tests)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The preset's overrides, then --quick's and the flags' (a key set twice keeps the later value:
    Hydra refuses a key given twice)."""
    out = list(PRESETS[args.preset]) + (QUICK_OVERRIDES if args.quick else [])
    if args.data_root is not None:
        out.append(f"paths.data_root={args.data_root}")
    if args.num_workers is not None:
        out.append(f"data.num_workers={args.num_workers}")
    if args.image_size is not None:
        out += [
            f"data.image_size=[{args.image_size},{args.image_size}]",
            "data.short=null",
            "data.max_size=null",
        ]
    out += args.override
    last = {o.split("=", 1)[0]: i for i, o in enumerate(out)}
    return [o for i, o in enumerate(out) if last[o.split("=", 1)[0]] == i]


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Measure, print and (with --json) write; the record, or None after a one-line error (no data)."""
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        overrides = overrides_of(args)
        cfg = compose_cfg(overrides, work / "run")
        root = Path(cfg.paths.data_root)
        if args.make_data:
            root = work / "shapes"
            _make_data_for(cfg, args, root)
            cfg = compose_cfg(overrides + [f"paths.data_root={root}"], work / "run")
        elif not has_data(root):
            print(
                f"error: {root}: no VQA data there (needs train questions, answers.json, tokenizer/); "
                "make it with `python -m gridvqa.data.synthetic DIR` and `python -m gridvqa.data.prepare "
                "DIR`, or pass --make-data",
                file=sys.stderr,
            )
            return None
        return measure(cfg, args, device, work, root)


def _loader_batches(args: argparse.Namespace, workers: int) -> int:
    return args.loader_batches or max(args.batches, 3 * workers + 2)


def _make_data_for(cfg, args: argparse.Namespace, root: Path) -> None:
    """Enough train items for the loader's passes: questions (one image each) or images (with theirs)."""
    per_image = 10  # questions per image: fewer images to draw for the same number of questions
    batch = int(cfg.data.batch_size)
    workers = max(int(cfg.data.num_workers), args.more_workers or 0)
    items = _loader_batches(args, workers) * batch + batch
    images = items if cfg.data.group_by_image else math.ceil(items / per_image) + 1
    sides = QUICK_SIDES if args.quick else DATA_SIDES[args.preset]
    make_data(root, train_images=max(16, images), sides=sides, questions_per_image=per_image)


def measure(cfg, args: argparse.Namespace, device: torch.device, work: Path, root: Path) -> dict | None:
    import hydra
    import pytorch_lightning as pl
    from omegaconf import open_dict

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # after its import, which sets INFO
    weights_note = "pre-trained"
    if cfg.backbone.get("weights") and not Path(cfg.backbone.weights).is_file():
        with open_dict(cfg):
            cfg.backbone.weights = None  # timing only: random weights cost the same
    if not cfg.backbone.get("weights"):
        weights_note = "random"
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    batches, _ = take(datamodule.train_dataloader(), args.batches)
    if not batches:
        print(f"error: {root}: the train loader gave no batch (every image unreadable?)", file=sys.stderr)
        return None
    precisions = [] if args.loader_only else args.precision or [str(cfg.trainer.precision)]
    record: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(device),
        "setting": setting_of(cfg, batches, weights_note),
        "precisions": {},
    }
    _print_setting(record, cfg)
    for precision in precisions:
        try:
            record["precisions"][precision] = measure_precision(cfg, precision, batches, args, device, work)
        except RuntimeError as e:  # e.g. an op without a kernel at this precision on this device
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{precision}: failed: {reason}", file=sys.stderr)
            record["precisions"][precision] = {"error": reason}
    workers = int(cfg.data.num_workers)
    record["loader"] = loader_figures(datamodule, _loader_batches(args, workers), args.repeats, workers,
                                      pin=device.type == "cuda")
    if args.more_workers and args.more_workers != workers:  # beside the goal's: what more processes give
        datamodule.hparams.num_workers = args.more_workers
        try:
            record["loader_more_workers"] = loader_figures(
                datamodule, _loader_batches(args, args.more_workers), args.repeats, args.more_workers,
                pin=device.type == "cuda",
            )  # fmt: skip
        finally:
            datamodule.hparams.num_workers = workers
    if args.compare_resize and cfg.data.source == "pixels":  # beside the goal's: the other resize placement
        other = not bool(cfg.data.get("resize_on_device"))
        figures = loader_figures(hydra.utils.instantiate(cfg.data, resize_on_device=other),
                                 _loader_batches(args, workers), args.repeats, workers,
                                 pin=device.type == "cuda")  # fmt: skip
        record["loader_other_resize"] = {**figures, "resize_on_device": other}
    record["ratios"] = ratios(record)
    print_table(record)
    if args.json is not None:
        write_json(args.json, record)
    return record


def setting_of(cfg, batches: list[dict], weights_note: str) -> dict[str, Any]:
    n = len(batches)
    h, w = batches[0]["pixel_mask"].shape[-2:]  # the network input (images may be unresized uint8)
    return {
        "experiment": cfg.task_name,
        "backbone": str(cfg.backbone.name),
        "weights": weights_note,
        "norm": str(cfg.backbone.norm),
        "freeze_at": int(cfg.backbone.freeze_at),
        "grad_checkpointing": bool(cfg.backbone.get("grad_checkpointing")),
        "channels_last": bool(cfg.backbone.get("channels_last")),
        "head": str(cfg.model.head.get("size", "small")),
        "image_size": [int(h), int(w)],
        "batches": n,
        "images_per_batch": sum(len(b["orig_size"]) for b in batches) / n,
        "questions_per_batch": sum(len(b["q_ids"]) for b in batches) / n,
        "workers": int(cfg.data.num_workers),
        "clip": cfg.trainer.get("gradient_clip_val"),
    }


def measure_precision(
    cfg, precision: str, batches: list[dict], args, device: torch.device, work: Path
) -> dict:
    """A fresh module at `precision`, fitted 1 + repeats epochs with the parts timed beside each."""
    import hydra
    import pytorch_lightning as pl
    from omegaconf import open_dict

    cfg = copy.deepcopy(cfg)  # the trainer settings change per precision
    with open_dict(cfg):
        cfg.trainer.precision = precision
    pl.seed_everything(cfg.seed, verbose=False)
    module = hydra.utils.instantiate(cfg.model).to(device)
    module.train()
    on_device = [to_device(b, device) for b in batches]
    passes = Passes(module, on_device, device, precision)
    fit_passes(cfg, module, passes, args.repeats, work / precision, device)
    out = figures_of(passes, on_device)
    out["answers"] = len(module.answers)
    del module, passes, on_device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def figures_of(passes: Passes, batches: list[dict]) -> dict[str, Any]:
    """Seconds per batch and images/s of each row (medians after the warm-up epoch), peak memory."""
    n = len(batches)
    images = sum(len(b["orig_size"]) for b in batches) / n
    t = {k: v[1:] for k, v in passes.times.items()}  # the first epoch of each kind was warm-up
    sec = {k: median(t[k]) / n for k in Passes.KINDS}
    sec["backbone+head"] = sec["backbone"] + sec["head"]
    sec["rest"] = sec["step"] - sec["backbone+head"] - sec["optimizer"] - sec["pixels"]
    rows = {
        k: {
            "seconds_per_batch": s,
            "images_per_s": images / s if s > 0 else None,
            "peak_memory_mb": passes.peak_mb.get(k),
        }
        for k, s in sec.items()
    }
    # per repeat, so that a load swing hits both sides of each ratio alike
    parts = median([(b + c) / a for a, b, c in zip(t["step"], t["backbone"], t["head"], strict=True)])
    return {"rows": rows, "step_over_parts": parts, "raw_pass_seconds": passes.times}


def ratios(record: dict[str, Any]) -> dict[str, Any]:
    """Per precision: step images/s over (b + c)'s (goal >= 0.85) and the loader's over the step's
    (goal >= 2); with both precisions, bf16-mixed step images/s over 32-true's (goal >= 1.8)."""
    loader = record["loader"]
    load_rate = loader["after_startup_images_per_s"] or loader["images_per_s"]
    out: dict[str, Any] = {}
    for precision, p in record["precisions"].items():
        if "error" in p:
            out[precision] = {"error": p["error"]}
            continue
        step = p["rows"]["step"]["images_per_s"]
        out[precision] = {
            "step_over_parts": p["step_over_parts"],
            "loader_over_step": ratio(load_rate, step),
            "loader_with_startup_over_step": ratio(loader["images_per_s"], step),
        }
    p = record["precisions"]
    if all(k in p for k in PRECISIONS):
        rates = [p[k]["rows"]["step"]["images_per_s"] if "rows" in p[k] else None for k in PRECISIONS]
        out["bf16_over_fp32"] = ratio(rates[1], rates[0])
    return out


ROW_NAMES = {
    "step": "(a) training step (Lightning fit)",
    "backbone": "(b) backbone forward + backward",
    "head": "(c) head forward + loss + backward",
    "backbone+head": "    b + c",
    "optimizer": "    optimizer: clip + AdamW + zero_grad (in a)",
    "pixels": "    pixels: resize / normalise on device (in a)",
    "rest": "    rest of a: Lightning + glue",
}


def _print_setting(record: dict[str, Any], cfg) -> None:
    s, env = record["setting"], record["environment"]
    load1, load5, _ = os.getloadavg()
    print(
        f"{s['experiment']}: backbone {s['backbone']} ({s['weights']} weights, {s['norm']}, freeze_at "
        f"{s['freeze_at']}, gradient checkpointing {s['grad_checkpointing']}, channels_last "
        f"{s['channels_last']}), head MCAN-{s['head']}"
    )
    print(
        f"{s['batches']} batches of {s['images_per_batch']:.1f} images {s['image_size'][1]}x"
        f"{s['image_size'][0]} / {s['questions_per_batch']:.1f} questions, clip {s['clip']}; "
        f"{record['args']['repeats']} repeats (median) after 1 warm-up"
    )
    print(
        f"device {env['device']} ({env['device_name']}), {env['cpus']} CPUs, torch {env['torch']}, "
        f"{env['threads']} threads, load average {load1:.2f} / {load5:.2f} (1 / 5 min)",
        flush=True,
    )


def _verdict(value: float | None, goal: float) -> str:
    if value is None:
        return "-"
    return "PASS" if value >= goal else "FAIL"


def print_table(record: dict[str, Any]) -> None:
    loader = record["loader"]
    for precision, p in record["precisions"].items():
        if "error" in p:
            print(f"{precision}: failed: {p['error']}")
            continue
        peak = p["rows"]["step"]["peak_memory_mb"]
        print(f"{precision}" + (f" (peak {peak:.0f} MiB in a)" if peak is not None else "") + ":")
        print(f"{'':48s}{'ms/batch':>10s}{'images/s':>11s}{'peak MiB':>10s}")
        for key, name in ROW_NAMES.items():
            r = p["rows"][key]
            rate = f"{r['images_per_s']:11.2f}" if r["images_per_s"] else f"{'-':>11s}"
            mem = f"{r['peak_memory_mb']:10.0f}" if r["peak_memory_mb"] is not None else f"{'-':>10s}"
            print(f"{name:48s}{1000 * r['seconds_per_batch']:10.1f}{rate}{mem}")
    steady = loader["after_startup_images_per_s"]
    steady_text = f"{steady:.1f}" if steady is not None else "-"
    print(
        f"(d) data loader, {loader['workers']} workers, fresh: {loader['images_per_s']:.1f} images/s, "
        f"{steady_text} after the start-up ({1000 * loader['startup_seconds']:.0f} ms to the first batch)"
    )
    more = record.get("loader_more_workers")
    if more is not None:
        rate = more["after_startup_images_per_s"] or more["images_per_s"]
        print(f"(d') data loader, {more['workers']} workers: {rate:.1f} images/s after the start-up")
    other = record.get("loader_other_resize")
    if other is not None:
        rate = other["after_startup_images_per_s"] or other["images_per_s"]
        where = "the device" if other["resize_on_device"] else "the workers"
        print(f"(d'') data loader, resize on {where}: {rate:.1f} images/s after the start-up")
    for precision, r in record["ratios"].items():
        if precision == "bf16_over_fp32" or "error" in r:
            continue
        s, ld = r["step_over_parts"], r["loader_over_step"]
        print(
            f"{precision}: step / (b + c) images/s = {s:.3f}  goal >= {STEP_GOAL}  {_verdict(s, STEP_GOAL)}"
        )
        print(
            f"{precision}: loader / step images/s  = {ld:.2f}x  goal >= {LOADER_GOAL}x  "
            f"{_verdict(ld, LOADER_GOAL)}"
        )
    if "bf16_over_fp32" in record["ratios"]:
        b = record["ratios"]["bf16_over_fp32"]
        text = f"{b:.2f}x" if b is not None else "-"
        print(f"bf16-mixed / 32-true step images/s = {text}  goal >= {BF16_GOAL}x  {_verdict(b, BF16_GOAL)}")


if __name__ == "__main__":
    sys.exit(main())
