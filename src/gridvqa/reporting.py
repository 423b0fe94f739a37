"""Run summaries (`metrics.json` in every run folder) and the sweep report built from them.

A training run writes one `metrics.json`; `python -m gridvqa.report SWEEP_DIR` gathers every one
under a folder, groups the runs by configuration (their Hydra overrides minus the seed) and
writes `report.md`, `report.csv` and `report.png` (mean ± sample standard deviation over seeds).

Kept free of torch / lightning so the report runs anywhere matplotlib does.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridvqa.data.jsonio import atomic_write_bytes, atomic_write_json, atomic_write_text
from gridvqa.errors import DataError

log = logging.getLogger(__name__)

SUMMARY_NAME = "metrics.json"
SUMMARY_VERSION = 1
# prefixes of the metrics a report tabulates beside the optimised one
REPORTED_PREFIXES = ("val/", "test/")
PLOT_LABEL_WIDTH = 40  # characters per line of a bar label in report.png


# ---------------------------------------------------------------------------------------------
# writing: one summary per run


def _hydra_job_info() -> dict[str, Any]:
    """Overrides, job number and experiment of the current Hydra job; empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    num = OmegaConf.select(hc, "job.num", default=None, throw_on_missing=False)  # `???` in single runs
    return {
        "overrides": [str(o) for o in OmegaConf.select(hc, "overrides.task", default=None) or []],
        "job_num": num if isinstance(num, int) else None,
        "experiment": OmegaConf.select(hc, "runtime.choices.experiment", default=None),
    }


def write_run_summary(
    cfg: Any, metrics: Mapping[str, float], value: float | None, minutes: float
) -> Path | None:
    """Write `${paths.output_dir}/metrics.json` for a finished run; None when the run has no output
    folder (a config composed outside Hydra without one)."""
    try:
        out = Path(str(cfg.paths.output_dir))
    except Exception as e:  # noqa: BLE001 - an unresolvable ${hydra:...} outside a Hydra job
        log.warning("no run summary: paths.output_dir is not available (%s)", e)
        return None
    info = _hydra_job_info()
    summary = {
        "format_version": SUMMARY_VERSION,
        "task_name": cfg.get("task_name"),
        "experiment": info.get("experiment"),
        "seed": cfg.get("seed"),
        "overrides": info.get("overrides", []),
        "job_num": info.get("job_num"),
        "optimized_metric": {"name": cfg.get("optimized_metric"), "value": value},
        "metrics": {k: float(v) for k, v in metrics.items()},
        "minutes": round(minutes, 4),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return atomic_write_json(out / SUMMARY_NAME, summary, indent=2)


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class RunRecord:
    """One run's summary as the report needs it."""

    path: Path
    task_name: str
    seed: int | None
    overrides: list[str]
    metrics: dict[str, float]
    optimized_metric: str | None
    minutes: float | None
    job_num: int | None = None


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def load_run(path: str | Path) -> RunRecord:
    """Parse one metrics.json; a malformed file raises a one-line DataError naming it."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: corrupt metrics.json (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: unreadable metrics.json ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{p}: corrupt metrics.json (expected an object, got {type(data).__name__})")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise DataError(f"{p}: corrupt metrics.json (no 'metrics' object)")
    values = {str(k): _number(v) for k, v in metrics.items()}
    bad = [k for k, v in values.items() if v is None]
    if bad:
        raise DataError(f"{p}: corrupt metrics.json (metric {bad[0]!r} is not a number)")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise DataError(f"{p}: corrupt metrics.json ('overrides' must be a list of strings)")
    opt = data.get("optimized_metric")
    opt_name = opt.get("name") if isinstance(opt, dict) else opt
    seed = data.get("seed")
    job_num = data.get("job_num")
    return RunRecord(
        path=p,
        task_name=str(data.get("task_name") or p.parent.name),
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        overrides=list(overrides),
        metrics=values,  # type: ignore[arg-type]  # None ruled out above
        optimized_metric=str(opt_name) if opt_name else None,
        minutes=_number(data.get("minutes")),
        job_num=job_num if isinstance(job_num, int) else None,
    )


def _natural_key(path: Path) -> list:
    """Sweep order: job folders 2 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def collect_runs(sweep_dir: str | Path) -> tuple[list[RunRecord], list[str]]:
    """Every metrics.json under `sweep_dir`, in sweep order, and one message per corrupt file skipped.

    Raises DataError when the folder does not exist, holds no metrics.json, or only corrupt ones.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    paths = sorted(root.rglob(SUMMARY_NAME), key=_natural_key)
    if not paths:
        raise DataError(
            f"{root}: no {SUMMARY_NAME} found (each training run writes one into its output folder)"
        )
    runs, problems = [], []
    for p in paths:
        try:
            runs.append(load_run(p))
        except DataError as e:
            problems.append(str(e))
    if not runs:
        more = f" (and {len(problems) - 1} more corrupt)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return runs, problems


# ---------------------------------------------------------------------------------------------
# grouping and statistics


def override_key(override: str) -> str:
    """`+seed=3` -> `seed`; `~foo` -> `foo`."""
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class Stat:
    mean: float
    std: float | None  # sample standard deviation; None with a single value
    n: int


def stat(values: Sequence[float]) -> Stat | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return Stat(
        mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else None, n=len(vals)
    )


@dataclass
class ConfigRow:
    """The runs of one configuration and their statistics."""

    label: str
    task_name: str
    overrides: tuple[str, ...]
    runs: list[RunRecord]
    stats: dict[str, Stat] = field(default_factory=dict)
    minutes: Stat | None = None

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs if r.seed is not None)


@dataclass
class Report:
    sweep_dir: Path
    rows: list[ConfigRow]
    metrics: list[str]  # table columns, the optimised metric(s) first
    primary: str | None  # the metric of the bar chart
    common: list[str]  # overrides shared by every run (left out of the labels)
    problems: list[str]

    @property
    def n_runs(self) -> int:
        return sum(len(r.runs) for r in self.rows)


def summarize(
    runs: Sequence[RunRecord],
    ignore: Iterable[str] = ("seed",),
    sweep_dir: str | Path = ".",
    problems: Sequence[str] = (),
) -> Report:
    """Group `runs` by (task, overrides minus the `ignore` keys) and compute mean ± std per metric."""
    ignore = set(ignore)
    groups: dict[tuple[str, tuple[str, ...]], list[RunRecord]] = {}
    for r in runs:
        key = tuple(sorted(o for o in r.overrides if override_key(o) not in ignore))
        groups.setdefault((r.task_name, key), []).append(r)

    keys = list(groups)
    common = sorted(set.intersection(*(set(k) for _, k in keys))) if keys else []
    opt_counts: dict[str, int] = {}
    for r in runs:
        if r.optimized_metric:
            opt_counts[r.optimized_metric] = opt_counts.get(r.optimized_metric, 0) + 1
    optimised = sorted(opt_counts, key=lambda m: -opt_counts[m])
    others = sorted({m for r in runs for m in r.metrics if m.startswith(REPORTED_PREFIXES)} - set(optimised))
    metrics = optimised + others

    rows = []
    several_tasks = len({t for t, _ in keys}) > 1
    for task, key in keys:
        members = groups[(task, key)]
        shown = [o for o in key if o not in common]
        label = " ".join(shown) or task
        if several_tasks and task not in label:
            label = f"{task}: {label}"
        row = ConfigRow(label=label, task_name=task, overrides=key, runs=members)
        for m in metrics:
            s = stat([r.metrics[m] for r in members if m in r.metrics])
            if s is not None:
                row.stats[m] = s
        row.minutes = stat([r.minutes for r in members if r.minutes is not None])
        rows.append(row)
    return Report(
        sweep_dir=Path(sweep_dir),
        rows=rows,
        metrics=metrics,
        primary=optimised[0] if optimised else (metrics[0] if metrics else None),
        common=common,
        problems=list(problems),
    )


# ---------------------------------------------------------------------------------------------
# output


def _fmt(x: float, like: float | None = None) -> str:
    """2 decimals for percent-sized numbers, 4 for fractions (AP, losses below 1); a std takes
    the decimals of its mean (`like`) so the pair lines up."""
    if math.isnan(x) or math.isinf(x):
        return str(x)
    ref = x if like is None or not math.isfinite(like) else like
    return f"{x:.2f}" if abs(ref) >= 1 else f"{x:.4f}"


def _fmt_stat(s: Stat | None) -> str:
    if s is None:
        return "–"
    return _fmt(s.mean) if s.std is None else f"{_fmt(s.mean)} ± {_fmt(s.std, like=s.mean)}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(report: Report) -> str:
    opt = {run.optimized_metric for row in report.rows for run in row.runs if run.optimized_metric}
    lines = [
        f"# Sweep report: {report.sweep_dir}",
        "",
        f"{report.n_runs} runs in {len(report.rows)} configurations; mean ± sample standard deviation "
        "over seeds (a single value where there is one run). Optimised metric in bold.",
    ]
    if report.common:
        lines += ["", "Overrides common to every run: " + " ".join(f"`{o}`" for o in report.common)]
    if report.problems:
        lines += ["", f"Skipped {len(report.problems)} corrupt metrics.json:"]
        lines += [f"- {_md_cell(p)}" for p in report.problems]
    head = ["configuration", "n", "seeds"] + [f"**{m}**" if m in opt else m for m in report.metrics]
    head.append("minutes")
    lines += ["", "| " + " | ".join(head) + " |", "| --- | ---: | --- |" + " ---: |" * (len(head) - 3)]
    for row in report.rows:
        cells = [f"`{_md_cell(row.label)}`", str(len(row.runs)), ",".join(map(str, row.seeds)) or "–"]
        cells += [_fmt_stat(row.stats.get(m)) for m in report.metrics]
        cells.append(_fmt_stat(row.minutes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["configuration", "task_name", "overrides", "n", "seeds"]
    for m in report.metrics:
        header += [f"{m}_mean", f"{m}_std"]
    header += ["minutes_mean", "minutes_std"]
    w.writerow(header)

    def num(x: float | None) -> str:
        return "" if x is None else repr(x)

    for row in report.rows:
        seeds = " ".join(map(str, row.seeds))
        out = [row.label, row.task_name, " ".join(row.overrides), len(row.runs), seeds]
        for m in report.metrics:
            s = row.stats.get(m)
            out += [num(s.mean if s else None), num(s.std if s else None)]
        out += [num(row.minutes.mean if row.minutes else None), num(row.minutes.std if row.minutes else None)]
        w.writerow(out)
    return buf.getvalue()


def plot_label(label: str, width: int = PLOT_LABEL_WIDTH) -> str:
    """A configuration's bar label on lines of at most `width` characters, broken between overrides
    (a single override longer than that keeps its own line)."""
    return textwrap.fill(label, width, break_long_words=False, break_on_hyphens=False)


def plot(report: Report, path: str | Path) -> Path | None:
    """Horizontal bars (long override labels stay readable): mean of the primary metric per
    configuration, sample std as error bars. None when no run logged that metric."""
    rows = [r for r in report.rows if report.primary and report.primary in r.stats]
    if not rows:
        return None
    # the object API, not pyplot: no global backend switch, safe on machines without a display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [plot_label(f"{r.label} (n={len(r.runs)})") for r in rows]
    widest = max(len(line) for label in labels for line in label.splitlines())
    lines = sum(label.count("\n") + 1 for label in labels)
    # room for the labels at fontsize 8 (~0.07 inch a character) beside a bar area of 5 inches
    fig = Figure(figsize=(5.5 + 0.07 * widest, 1.2 + 0.3 * len(rows) + 0.15 * lines), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    means = [r.stats[report.primary].mean for r in rows]
    errs = [r.stats[report.primary].std or 0.0 for r in rows]
    ys = list(range(len(rows)))[::-1]  # first configuration on top
    bars = ax.barh(ys, means, xerr=errs, capsize=4, color="#4c72b0", ecolor="black")
    ax.bar_label(bars, labels=[_fmt(m) for m in means], label_type="center", color="white", fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel(f"{report.primary} (mean ± std over seeds)")
    ax.set_title(f"{report.sweep_dir.name or report.sweep_dir}: {report.primary}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, ignore: Iterable[str] = ("seed",)
) -> tuple[Report, dict[str, Path]]:
    """Collect, summarise and write report.md / report.csv / report.png into `out_dir` (default:
    the sweep folder). Returns the report and the paths written."""
    runs, problems = collect_runs(sweep_dir)
    for p in problems:
        log.warning("skipped %s", p)
    report = summarize(runs, ignore=ignore, sweep_dir=sweep_dir, problems=problems)
    return report, write_report_files(report, Path(out_dir) if out_dir is not None else Path(sweep_dir))


def write_report_files(report: Report, out: Path) -> dict[str, Path]:
    """report.md, report.csv and report.png in `out`: {"md"|"csv"|"png": path}."""
    written = {
        "md": atomic_write_text(out / "report.md", to_markdown(report)),
        "csv": atomic_write_text(out / "report.csv", to_csv(report)),
    }
    png = plot(report, out / "report.png")
    if png is not None:
        written["png"] = png
    return written
