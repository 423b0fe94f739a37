"""End-to-end training step vs its parts, and the data loader vs the step, side by side in one run.

    python scripts/bench_train.py [--data-root DIR | --make-data] [--batches 10] [--repeats 5] \
        [--num-workers N] [--image-size S] [--device cpu|cuda] [--override key=value ...]

The real `experiment=e2e` configuration (composed by Hydra, built by hydra.utils.instantiate) on N real
batches of the train loader, pre-loaded into memory for the compute timings:
  (a) the training step as Lightning runs it: a real `pl.Trainer` fit over the pre-loaded batches, one epoch
      per measurement (forward, loss, logging, backward, gradient clipping, Adam, LR scheduler, loop code)
  (b) the backbone alone: forward + backward on the same images
  (c) the head alone: forward + loss + backward on the same visual features (detached from the backbone but
      requiring grad, so the head's backward also makes the gradient the step hands to the backbone)
  (d) the data loader alone: a fresh train loader with the configured workers over N batches, no compute
Targets: a <= 1.15 x (b + c); d's rate >= 2 x the step's. A miss is printed, not an error (exit 0).

(b), (c) and the optimizer alone run inside the fit, after each epoch (a timing callback), so that every
measurement of each kind sits next to one of the others: load swings on a shared CPU hit them alike.
The first epoch of each kind is warm-up; the figures are medians over --repeats.
Without the pre-trained backbone (artifacts/pretrain_vg) the weights are random: timing is all we need.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from gridvqa.config import conf_dir, register_resolvers
from gridvqa.data import layout

STEP_GOAL = 1.15  # (a) / (b + c) at most
LOADER_GOAL = 2.0  # loader batches/s / step batches/s at least


def compose_cfg(overrides: list[str], output_dir: Path):
    """The config `python -m gridvqa.train` would see (hydra node dropped, its runtime dir set)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)  # for ${hydra:...} interpolations (paths.output_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def has_data(root: Path) -> bool:
    return all(
        p.is_file()
        for p in (
            layout.questions_path(root, "train"),
            layout.answers_path(root),
            layout.tokenizer_dir(root) / "tokenizer.json",
        )
    )


def make_data(root: Path, train_images: int) -> None:
    """A small built-in set (train split + answers + tokenizer) for timing only."""
    from gridvqa.data.prepare import prepare
    from gridvqa.data.synthetic import generate

    generate(root, train_images=train_images, val_images=4, test_images=0, seed=0)
    prepare(root, min_count=1)  # a few images: keep every answer so the head has a real classifier


def sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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


def take(loader: Iterable, n: int) -> tuple[list, float, float]:
    """Up to n non-empty batches from a fresh iterator: (batches, seconds in all, seconds to the first)."""
    start = time.perf_counter()
    it = iter(loader)
    out, first = [], None
    for b in islice(it, n):
        if first is None:
            first = time.perf_counter() - start
        if b is not None:
            out.append(b)
    seconds = time.perf_counter() - start
    del it  # the workers stop with the iterator (persistent ones once the caller drops the loader too)
    return out, seconds, first or seconds


def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # as VQAModule.training_step: BCE on soft scores, summed over answers, averaged over questions
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / logits.shape[0]


class Passes:
    """Timed passes over the pre-loaded batches of each kind; seconds per pass, one list per kind."""

    def __init__(self, module, batches: list[dict], device: torch.device, precision: str) -> None:
        self.module, self.batches = module, batches
        self.sync = sync_fn(device)
        self.autocast = autocast_for(precision, device)
        feature = module.hparams.backbone_feature
        channels_last = bool(module.hparams.backbone.get("channels_last"))
        # Inputs each pass starts from, made once and outside the timers.
        self.images = [
            b["images"].contiguous(memory_format=torch.channels_last) if channels_last else b["images"]
            for b in batches
        ]
        self.feature = feature
        self.times: dict[str, list[float]] = {"step": [], "backbone": [], "head": [], "optimizer": []}

    def _timed(self, fn: Callable[[], None]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def backbone(self) -> None:
        m, total = self.module, 0.0
        for x in self.images:
            m.zero_grad(set_to_none=True)

            def run(x=x) -> None:
                with self.autocast():
                    feats = m.backbone(x)[self.feature]
                if feats.requires_grad:  # a frozen backbone (an override) has no backward to time
                    feats.float().sum().backward()

            total += self._timed(run)
        self.times["backbone"].append(total)

    def head(self) -> None:
        m, total = self.module, 0.0
        for b in self.batches:
            with torch.no_grad(), self.autocast():
                feats, mask, _ = m.visual_inputs(b)
            feats = feats.detach().requires_grad_(True)
            m.zero_grad(set_to_none=True)

            def run(b=b, feats=feats, mask=mask) -> None:
                idx = b["img_index"]  # each question takes its image's features, as VQAModule.forward
                with self.autocast():
                    logits = m.head(b["q_ids"], b["q_mask"], feats[idx], mask[idx])
                loss_of(logits, b["target"]).backward()

            total += self._timed(run)
        self.times["head"].append(total)

    def optimizer(self, trainer) -> None:
        """Gradient clipping + Adam step + zero_grad, on the gradients of a real step (made untimed)."""
        m, opt, total = self.module, trainer.optimizers[0], 0.0
        clip_val, clip_algo = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
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
        self.times["optimizer"].append(total)


def make_timer(passes: Passes):
    import pytorch_lightning as pl

    class EpochTimer(pl.Callback):
        """Times each training epoch (= one pass over the pre-loaded batches), then runs the other passes."""

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            passes.sync()
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            passes.sync()
            passes.times["step"].append(time.perf_counter() - self.t0)
            with torch.enable_grad():
                passes.backbone()
                passes.head()
                passes.optimizer(trainer)
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


def loader_passes(datamodule, n: int, repeats: int) -> tuple[list[float], list[float], int]:
    """Fresh train loaders (configured workers, shuffled, worker start-up included) over n batches."""
    times, firsts, count = [], [], 0
    for _ in range(repeats):
        loader = datamodule.train_dataloader()
        got, seconds, first = take(loader, n)
        count = len(got)
        times.append(seconds)
        firsts.append(first)
        del loader, got
        gc.collect()
    return times, firsts, count


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-root", type=Path, default=None, help="VQA data root (default: the config's, data/shapes)"
    )
    p.add_argument(
        "--make-data",
        action="store_true",
        help="if the data root has no data: generate a small set in a temp dir",
    )
    p.add_argument("--batches", type=int, default=10, help="batches per measured pass (N)")
    p.add_argument("--repeats", type=int, default=5, help="measured passes per kind (after one warm-up)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the config's)")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: the config's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--override", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for compose"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a busy CPU, fewer threads than cores can be much faster
    try:
        return bench(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (tests)


def bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        overrides = ["experiment=e2e"]
        if args.data_root is not None:
            overrides.append(f"paths.data_root={args.data_root}")
        if args.num_workers is not None:
            overrides.append(f"data.num_workers={args.num_workers}")
        if args.image_size is not None:
            overrides.append(f"data.image_size=[{args.image_size},{args.image_size}]")
        overrides += args.override
        cfg = compose_cfg(overrides, work / "run")
        root = Path(cfg.paths.data_root)
        if not has_data(root):
            if not args.make_data:
                print(
                    f"error: {root}: no VQA data there (needs train questions, answers.json, tokenizer/); "
                    "make it with `python -m gridvqa.data.synthetic DIR` and `python -m gridvqa.data.prepare "
                    "DIR`, or pass --make-data",
                    file=sys.stderr,
                )
                return 2
            root = work / "shapes"
            make_data(root, train_images=max(16, args.batches * int(cfg.data.batch_size)))
            cfg = compose_cfg(overrides + [f"paths.data_root={root}"], work / "run")
        return run(cfg, args, device, work, root)


def run(cfg, args: argparse.Namespace, device: torch.device, work: Path, root: Path) -> int:
    import hydra
    import pytorch_lightning as pl
    from omegaconf import open_dict

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # after its import, which sets INFO
    weights_note = "pre-trained"
    if cfg.backbone.get("weights") and not Path(cfg.backbone.weights).is_file():
        with open_dict(cfg):
            cfg.backbone.weights = None  # timing only: random weights cost the same
        weights_note = "random"
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model).to(device)
    module.train()
    batches, _, _ = take(datamodule.train_dataloader(), args.batches)
    if not batches:
        print(f"error: {root}: the train loader gave no batch (every image unreadable?)", file=sys.stderr)
        return 2
    batches = [to_device(b, device) for b in batches]
    gc.collect()
    n = len(batches)
    passes = Passes(module, batches, device, str(cfg.trainer.precision))
    fit_passes(cfg, module, passes, args.repeats, work, device)
    load_times, load_firsts, load_count = loader_passes(datamodule, n, args.repeats)

    t = {k: v[1:] for k, v in passes.times.items()}  # the first epoch of each kind was warm-up
    step, bb, head, opt = (median(t[k]) / n for k in ("step", "backbone", "head", "optimizer"))
    step_ratio = median([a / (b + c) for a, b, c in zip(t["step"], t["backbone"], t["head"], strict=True)])
    load = median(load_times) / max(load_count, 1)
    load_ratio = (1 / load) / (1 / step)
    questions = sum(len(b["q_ids"]) for b in batches) / n
    images = sum(len(b["images"]) for b in batches) / n
    h, w = batches[0]["images"].shape[-2:]
    workers = int(cfg.data.num_workers)

    load1, load5, _ = os.getloadavg()
    print(
        f"experiment=e2e: backbone {cfg.backbone.name} ({weights_note} weights, {cfg.backbone.norm}, "
        f"freeze_at {cfg.backbone.freeze_at}), head MCAN-{cfg.model.head.get('size', 'small')}, "
        f"{len(module.answers)} answers"
    )
    print(
        f"{n} batches of {images:.1f} images {w}x{h} / {questions:.1f} questions, "
        f"precision {cfg.trainer.precision}, clip {cfg.trainer.get('gradient_clip_val')}; "
        f"{args.repeats} repeats (median) after 1 warm-up"
    )
    print(
        f"device {device} ({_device_name(device)}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load1:.2f} / {load5:.2f} (1 / 5 min)"
    )
    rows = [
        ("(a) training step (Lightning fit)", step),
        ("(b) backbone forward + backward", bb),
        ("(c) head forward + loss + backward", head),
        ("    b + c", bb + head),
        ("    optimizer: clip + Adam + zero_grad (in a)", opt),
        ("    rest of a: Lightning + glue", step - bb - head - opt),
        (f"(d) data loader, {workers} workers, fresh", load),
    ]
    print(f"{'':48s}{'ms/batch':>10s}{'batches/s':>11s}")
    for name, sec in rows:
        rate = f"{1 / sec:11.2f}" if sec > 0 else f"{'-':>11s}"
        print(f"{name:48s}{1000 * sec:10.1f}{rate}")
    print(f"    loader start-up (to the first batch): {1000 * median(load_firsts):.0f} ms")
    ok_step, ok_load = step_ratio <= STEP_GOAL, load_ratio >= LOADER_GOAL
    print(f"step / (b + c) = {step_ratio:.3f}  goal <= {STEP_GOAL}  {'PASS' if ok_step else 'FAIL'}")
    print(f"loader / step  = {load_ratio:.2f}x  goal >= {LOADER_GOAL}x  {'PASS' if ok_load else 'FAIL'}")
    if args.json is not None:
        figures = {
            "seconds_per_batch": dict(zip([r[0].strip() for r in rows], [r[1] for r in rows], strict=True)),
            "raw_pass_seconds": passes.times,
            "loader_pass_seconds": load_times,
            "step_ratio": step_ratio,
            "loader_ratio": load_ratio,
            "batches": n,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps(figures, indent=1), encoding="utf-8")
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
