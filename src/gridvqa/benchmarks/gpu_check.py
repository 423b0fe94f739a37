"""Every speed goal of the project measured in one run, written as a JSON record and a markdown table.

    python -m gridvqa.benchmarks.gpu_check OUT [--device cuda] [--quick] [--commit SHA]
    (scripts/gpu_check.sh OUT [...] installs if needed, records the git commit and calls this)

Parts, each one of the benchmarks of this package (random weights, timing only), in one process:
  extraction X-152   600x1000, float32 and bfloat16: bare backbone at its best batch, grid extraction,
                     region extraction with bottom-up's 1000 proposals
  extraction R-50    the same without the region row
  training R-50      the paper's end-to-end step (448x448, MCAN small, 64 questions), 32-true and bf16-mixed:
                     the step, backbone and head fwd+bwd alone, the loader alone
Goals (docs/gpu.md): grid >= 0.8x the bare backbone (X-152 and R-50); region@1000 >= 10x grid's time
(X-152); the training step >= 0.85x the images/s of its parts timed alone, the loader >= 2x the step;
bfloat16 >= 1.8x float32 throughput. Each part's own JSON goes beside the summary. --quick runs the same
rows at tiny sizes (R-tiny, a few small images) so that the whole check runs on a CPU in about a minute.
A part that fails is recorded with its error; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gridvqa.benchmarks.common import write_json
from gridvqa.devices import resolve_device

GRID_GOAL = 0.8  # grid extraction images/s / bare backbone images/s (its best batch)
REGION_GOAL = 10.0  # region@1000 time per image / grid time per image (X-152)
BF16_GOAL = 1.8  # bfloat16 throughput / float32 throughput
STEP_GOAL = 0.85  # training step images/s / (backbone + head fwd+bwd alone) images/s
LOADER_GOAL = 2.0  # loader images/s / training step images/s
JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"
CUDNN_BENCHMARK = torch.backends.cudnn.benchmark
TRAINING_ROWS = {
    "step": "training step (Lightning fit)",
    "backbone": "backbone fwd+bwd alone",
    "head": "head fwd+loss+bwd alone",
    "backbone+head": "backbone + head alone",
    "optimizer": "optimizer (in the step)",
    "pixels": "pixels: resize / normalise on the device (in the step)",
    "rest": "rest of the step (Lightning, glue)",
}

# the grid row again with one setting changed each (beside the goals): what the pipeline waits on
GRID_VARIANTS = [
    "writer_thread=false", "num_workers=4", "num_workers=12", "batch_size=16", "preprocess=workers",
    "commit_images=64",  # a quarter of the maps held in pinned memory until written: fewer new blocks
]  # fmt: skip
FULL_EXTRACTION = [
    "--size", "600", "1000", "--batch", "8", "--backbone-batches", "1", "4", "8", "16",
    "--workers", "8", "--precision", "float32", "bfloat16", "--profile",
    *(arg for v in GRID_VARIANTS for arg in ("--grid-variant", v)),
]  # fmt: skip
QUICK_EXTRACTION = [
    "--arch", "R-tiny", "--size", "64", "96", "--images", "3", "--batch", "2", "--backbone-batches", "1", "2",
    "--workers", "1", "--precision", "float32", "bfloat16", "--profile",
    "--grid-variant", "writer_thread=false",
]  # fmt: skip
FULL_TRAINING = [
    "--make-data", "--batches", "8", "--repeats", "3", "--precision", "32-true", "bf16-mixed",
    "--more-workers", "14", "--compare-resize",
]  # fmt: skip
QUICK_TRAINING = [
    "--quick", "--precision", "32-true", "bf16-mixed", "--more-workers", "2", "--compare-resize",
]  # fmt: skip
COMPILED_TRAINING = [
    "--make-data", "--batches", "8", "--repeats", "2", "--precision", "bf16-mixed",
    "--override", "model.compile_head=true",
]  # fmt: skip


def parts(args: argparse.Namespace, out: Path) -> list[tuple[str, str, list[str]]]:
    """(name, benchmark module, its arguments) of each part."""
    device = ["--device", args.device]
    if args.quick:
        x152 = [*QUICK_EXTRACTION, "--proposals", "20"]
        r50 = [*QUICK_EXTRACTION, "--proposals"]
        train = QUICK_TRAINING
    else:
        # enough images that the grid row's window after the workers' start-up (its first 64 images)
        # lasts over a second: 128 gave R-50 about 0.3 s
        x152 = ["--arch", "X-152-32x8d", "--images", "256", *FULL_EXTRACTION, "--proposals", "1000"]
        r50 = ["--arch", "R-50", "--images", "512", *FULL_EXTRACTION, "--proposals"]
        train = FULL_TRAINING
    out_parts = [
        ("extraction_x152", "extraction", [*x152, *device, "--json", str(out / "extraction_x152.json")]),
        ("extraction_r50", "extraction", [*r50, *device, "--json", str(out / "extraction_r50.json")]),
        ("training_r50_448", "training", [*train, *device, "--json", str(out / "training_r50_448.json")]),
    ]
    if not args.quick:  # rows beside the goals: the same step with the head compiled (minutes on a CPU)
        compiled = [*COMPILED_TRAINING, *device, "--json", str(out / "training_compiled_head.json")]
        out_parts.append(("training_compiled_head", "training", compiled))
    return out_parts


def run_part(module: str, argv: list[str]) -> dict[str, Any]:
    """One benchmark in this process: its record, or {"error": ...} when it raised."""
    from gridvqa.benchmarks import extraction, training

    bench: dict[str, Callable[[argparse.Namespace], dict | None]] = {
        "extraction": extraction.run,
        "training": training.run,
    }
    parse = {"extraction": extraction.parse_args, "training": training.parse_args}
    # each part starts with torch's global settings as a fresh process has them (extraction turns on
    # cuDNN's autotuner, which Lightning would otherwise inherit)
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
    start = time.perf_counter()
    try:
        record = bench[module](parse[module](argv))
        if record is None:
            record = {"error": "no figures (see the message above)"}
    except Exception as e:  # noqa: BLE001 - a part that fails is reported; the other parts still run
        traceback.print_exc()
        record = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    record["wall_seconds"] = time.perf_counter() - start
    gc.collect()  # the part's models and batches, before the next part measures its peak memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def _short(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "–"


def goal(name: str, value: float | None, target: float, note: str = "") -> dict[str, Any]:
    return {
        "goal": name,
        "value": value,
        "target": target,
        "pass": None if value is None else value >= target,
        "note": note,
    }


def extraction_goals(label: str, record: dict[str, Any], region: bool) -> list[dict[str, Any]]:
    if "error" in record:
        return [goal(f"extraction {label}", None, 0, record["error"])]
    arch, out = record["args"]["arch"], []
    if not arch.startswith(label):  # --quick: a small model stands in for the part's own
        arch = f"{arch} for {label}"
    ratios = record["ratios"]
    for precision in record["args"]["precision"]:
        r = ratios[precision]
        grid = r["grid_after_startup_over_backbone"] or r["grid_over_backbone"]
        note = f"whole run, loader start-up included: {_num(r['grid_over_backbone'])}"
        row = record.get("precisions", {}).get(precision, {}).get("results", {}).get("grid", {})
        if row.get("pinned_allocs"):  # a one-off cost a long run amortises, in a short one it shows
            note += f"; {row.get('pinned_alloc_seconds', 0.0):.2f} s of it page-locking new host memory"
        out.append(goal(f"grid / bare backbone images/s, {arch}, {precision}", grid, GRID_GOAL, note))
        if region:
            for key, v in r.items():
                if key.startswith("region@") and key.endswith("_over_grid"):
                    name = key.removesuffix("_over_grid")
                    out.append(goal(f"{name} / grid time per image, {arch}, {precision}", v, REGION_GOAL))
    bf16 = ratios.get("bfloat16_over_float32", {})
    strict = ratios.get("bfloat16_over_float32_no_tf32")
    for row in ("backbone", "grid"):
        if row in bf16:
            with_strict = row == "backbone" and strict is not None
            note = f"float32 with TF32 off: {_num(strict)}" if with_strict else ""
            out.append(goal(f"bfloat16 / float32 {row} images/s, {arch}", bf16[row], BF16_GOAL, note))
    return out


def training_goals(record: dict[str, Any]) -> list[dict[str, Any]]:
    if "error" in record:
        return [goal("training", None, 0, record["error"])]
    backbone, out = record["setting"]["backbone"], []
    for precision, r in record["ratios"].items():
        if precision == "bf16_over_fp32":
            continue
        if "error" in r:
            out.append(goal(f"training step, {backbone}, {precision}", None, STEP_GOAL, r["error"]))
            continue
        name = f"training step / (backbone + head alone) images/s, {backbone}, {precision}"
        out.append(goal(name, r["step_over_parts"], STEP_GOAL))
        note = f"with the workers' start-up: {_num(r['loader_with_startup_over_step'])}"
        out.append(goal(f"loader / training step images/s, {backbone}, {precision}", r["loader_over_step"],
                        LOADER_GOAL, note))  # fmt: skip
    if "bf16_over_fp32" in record["ratios"]:
        errors = [p["error"] for p in record["precisions"].values() if "error" in p]
        out.append(goal(f"bf16-mixed / 32-true training step images/s, {backbone}",
                        record["ratios"]["bf16_over_fp32"], BF16_GOAL, "; ".join(errors)))  # fmt: skip
    return out


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every measured row: part, row, precision, images/s, peak memory."""
    rows = []
    for part, record in results.items():
        for precision, p in (record.get("precisions") or {}).items():
            if "results" in p:  # an extraction record
                arch = record["args"]["arch"]
                for name, r in p["results"].items():
                    rows.append(_row(part, f"{name} ({arch})", precision, r["images_per_s"], r))
            elif "rows" in p:  # a training record
                for name, label in TRAINING_ROWS.items():
                    r = p["rows"][name]
                    rows.append(_row(part, label, precision, r["images_per_s"], r))
        # the breakdown and the grid variants are timed at the first precision, beside its rows
        breakdown = record.get("breakdown") or {}
        first = record.get("args", {}).get("precision", ["float32"])[0]
        unfolded = breakdown.get("backbone_bn_unfolded")
        if unfolded is not None:
            label = f"backbone, BN not folded ({record['args']['arch']})"
            rows.append(_row(part, label, first, unfolded["images_per_s"], unfolded))
        for key, label in (("writer", "writer alone"), ("writer_in_memory", "writer alone, into RAM")):
            r = breakdown.get(key)
            if r is not None:  # the grid file's maps, as many: the disk's share of the writer's time
                rows.append(_row(part, f"{label} ({record['args']['arch']})", first, r["images_per_s"], r))
        for variant, r in (record.get("grid_variants") or {}).items():
            label = f"grid, {variant}, after start-up ({record['args']['arch']})"
            rate = r.get("after_startup_images_per_s") or r["images_per_s"]
            rows.append(_row(part, label, first, rate, r))
        strict = breakdown.get("backbone_no_tf32")
        if strict is not None:
            label = f"backbone, TF32 off ({record['args']['arch']})"
            rows.append(_row(part, label, "float32", strict["images_per_s"], strict))
        for key in ("loader", "loader_more_workers", "loader_other_resize"):
            if key in record:
                loader = record[key]
                rate = loader["after_startup_images_per_s"] or loader["images_per_s"]
                label = f"data loader alone, {loader['workers']} workers, after start-up"
                if "resize_on_device" in loader:
                    label += ", resize on " + ("the device" if loader["resize_on_device"] else "the workers")
                rows.append(_row(part, label, "–", rate, {}))
    return rows


def _row(part: str, name: str, precision: str, rate: float | None, r: dict) -> dict[str, Any]:
    return {
        "part": part,
        "row": name,
        "precision": precision,
        "images_per_s": rate,
        "peak_memory_mb": r.get("peak_memory_mb"),
    }


def markdown(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    lines = [
        "# Speed check",
        "",
        f"- commit: `{summary['commit']}`",
        f"- device: {env['device_name']} ({env['device']}"
        + (f", {env['device_memory_mb'] / 1024:.0f} GiB" if "device_memory_mb" in env else "")
        + f"), torch {env['torch']}"
        + (f", CUDA {env['cuda']}" if env["device"].startswith("cuda") else "")
        + f", {env['cpus']} CPUs",
        f"- date: {env['date']}; {'quick (tiny sizes)' if summary['quick'] else 'full sizes'}; "
        f"{summary['wall_seconds']:.0f} s in all",
        "",
        "## Goals",
        "",
        "| goal | measured | target | |",
        "| --- | ---: | ---: | --- |",
    ]
    for g in summary["goals"]:
        value = _num(g["value"])
        verdict = {True: "PASS", False: "FAIL", None: "–"}[g["pass"]]
        note = f" ({_short(g['note'])})" if g["note"] else ""
        lines.append(f"| {g['goal']} | {value} | ≥ {g['target']:g} | {verdict}{note} |")
    lines += [
        "",
        "## Rows",
        "",
        "| part | row | precision | images/s | peak MiB |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for r in summary["rows"]:
        rate = f"{r['images_per_s']:.2f}" if r["images_per_s"] else "–"
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "–"
        lines.append(f"| {r['part']} | {r['row']} | {r['precision']} | {rate} | {mem} |")
    profiles = summary.get("profiles") or {}
    if profiles:
        lines += ["", "## Where a grid run's time went (profiled, first precision)", ""]
        for part, p in profiles.items():
            busy = p.get("device_busy_fraction")
            busy_text = f"device busy {busy:.0%} of {p['wall_seconds']:.2f} s" if busy is not None else (
                f"{p['wall_seconds']:.2f} s")
            host = "; ".join(f"{n} {ms:.0f} ms x{c}" for n, ms, c in p["host_top_ms"][:5])
            lines.append(f"- {part}: {busy_text}; host self time: {_short(host, 400)}")
    errors = [(k, v["error"]) for k, v in summary["parts"].items() if "error" in v]
    if errors:
        lines += ["", "## Failed parts", ""] + [f"- {k}: {e}" for k, e in errors]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and each part's JSON")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default: cuda when there is one)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every row in about a minute on a CPU")
    p.add_argument("--commit", default="unknown", help="the git commit measured (recorded as given)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from gridvqa.benchmarks.common import environment

    args = parse_args(argv)
    device = resolve_device(args.device)
    args.device = device.type
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {}
    for name, module, argv_part in parts(args, args.out):
        print(f"== {name}: python -m gridvqa.benchmarks.{module} {' '.join(argv_part)}", flush=True)
        results[name] = run_part(module, argv_part)
    goals = extraction_goals("X-152", results["extraction_x152"], region=True)
    goals += extraction_goals("R-50", results["extraction_r50"], region=False)
    goals += training_goals(results["training_r50_448"])
    summary = {
        "commit": args.commit,
        "quick": args.quick,
        "environment": environment(device),
        "wall_seconds": time.perf_counter() - start,
        "goals": goals,
        "rows": summary_rows(results),
        "profiles": {k: v["profile"] for k, v in results.items() if v.get("profile")},
        "parts": {
            k: {"error": v["error"]} if "error" in v else {"json": f"{k}.json"} for k, v in results.items()
        },
    }
    write_json(args.out / JSON_NAME, summary)
    from gridvqa.atomic import atomic_write_text

    atomic_write_text(args.out / MD_NAME, markdown(summary))
    print(markdown(summary))
    return 1 if any("error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
