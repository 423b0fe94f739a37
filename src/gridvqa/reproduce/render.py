"""What reproduce reports: the findings' verdicts (is a gap beyond the seeds' spread?), results.md with
the accuracy table and the extraction benchmark, report.md/csv/png, and the results block of another
Markdown file (docs/results.md by default)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridvqa.data.jsonio import atomic_write_bytes, atomic_write_text
from gridvqa.errors import ConfigError, DataError
from gridvqa.reporting import RunRecord, Stat, load_run, stat, summarize, write_report_files
from gridvqa.reproduce.options import (
    ANSWER_TYPES,
    BEGIN,
    BENCH_FILE,
    END,
    METRIC,
    PLUMBING,
    RESULTS_FILE,
    Options,
    merge_overrides,
    read_steps,
    rel,
)

# ---------------------------------------------------------------------------------------------
# findings


@dataclass
class Verdict:
    claim: str
    measured: str
    holds: bool | None  # None: not measured in this run
    note: str = ""

    @property
    def answer(self) -> str:
        if self.holds is None:
            return "not measured"
        return ("yes" if self.holds else "no") + (f", {self.note}" if self.note else "")


def _pm(s: Stat | None) -> str:
    if s is None:
        return "–"
    return f"{s.mean:.2f}" if s.std is None else f"{s.mean:.2f} ± {s.std:.2f}"


def compare_better(a: str, sa: Stat | None, b: str, sb: Stat | None) -> Verdict:
    """Is a's mean accuracy above b's, and is the gap beyond what the seeds' spread explains
    (twice the standard error of the difference of the means)?"""
    claim = f"`{a}` > `{b}`"
    if sa is None or sb is None:
        return Verdict(claim, "–", None)
    diff = sa.mean - sb.mean
    measured = f"{_pm(sa)} vs {_pm(sb)} ({diff:+.2f})"
    if sa.std is None or sb.std is None:
        return Verdict(claim, measured, diff > 0, "one seed: no spread to judge the gap by")
    two_se = 2 * math.sqrt(sa.std**2 / sa.n + sb.std**2 / sb.n)
    if abs(diff) > two_se:
        note = f"beyond the seeds' spread (2 s.e. {two_se:.2f})"
    else:
        note = f"but within the seeds' spread (2 s.e. {two_se:.2f})"
    return Verdict(claim, measured, diff > 0, note)


def compare_close(grid: str, sg: Stat | None, region: str, sr: Stat | None, points: float) -> Verdict:
    """Grid at most `points` below region (above it counts as holding too)."""
    claim = f"`{grid}` (grid) within {points:g} points of `{region}`"
    if sg is None or sr is None:
        return Verdict(claim, "–", None)
    diff = sg.mean - sr.mean
    measured = f"{_pm(sg)} vs {_pm(sr)} ({diff:+.2f})"
    note = "grid is better" if diff > 0 else ""
    return Verdict(claim, measured, diff >= -points, note)


def bench_ratios(bench: Mapping[str, Any]) -> dict[str, float]:
    """region@P time per image / grid time per image, per P."""
    res = bench.get("results", {})
    g = res.get("grid")
    if not g or not g.get("images"):
        return {}
    grid_t = g["seconds"] / g["images"]
    return {
        name: (r["seconds"] / r["images"]) / grid_t
        for name, r in res.items()
        if name.startswith("region@") and r.get("images") and grid_t > 0
    }


def compare_cost(bench: Mapping[str, Any] | None, min_ratio: float) -> Verdict:
    claim = f"grid extraction at a fraction of region's cost (region ≥ {min_ratio:g}x grid's time)"
    ratios = bench_ratios(bench) if bench else {}
    if not ratios:
        return Verdict(claim, "–", None)
    measured = ", ".join(f"{name}: {r:.1f}x" for name, r in ratios.items())
    return Verdict(claim, measured, min(ratios.values()) >= min_ratio)


# ---------------------------------------------------------------------------------------------
# writing the results


def _stats(runs: Sequence[RunRecord], metric: str) -> Stat | None:
    return stat([r.metrics[metric] for r in runs if metric in r.metrics])  # logged in percent


def _blind_prior(data_root: Path) -> float | None:
    try:
        stats = json.loads((data_root / "stats.json").read_text(encoding="utf-8"))
        return float(stats["blind_prior"]["overall"]["question_prior"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_bench(opts: Options) -> dict[str, Any] | None:
    if opts.bench is None:
        return None
    try:
        return json.loads((opts.results_dir / BENCH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _code(items: Iterable[str]) -> str:
    return " ".join(f"`{o}`" for o in items) or "none"


def plot_extraction(bench: Mapping[str, Any], path: Path) -> Path | None:
    """Seconds per image of each benchmark row (log scale: region and grid differ by orders of
    magnitude), labelled with its multiple of the grid's time."""
    res = bench.get("results", {})
    rows = [(n, r["seconds"] / r["images"]) for n, r in res.items() if r.get("images")]
    grid = dict(rows).get("grid")
    if not rows or not grid:
        return None
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = {"backbone": "bare backbone forward", "grid": "grid extraction"}
    fig = Figure(figsize=(7, 1.2 + 0.5 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    colors = ["#8c8c8c" if n == "backbone" else "#4c72b0" if n == "grid" else "#dd8452" for n, _ in rows]
    bars = ax.barh(ys, [t * 1000 for _, t in rows], color=colors)
    ax.bar_label(
        bars, labels=[f"{t * 1000:.1f} ms ({t / grid:.1f}x grid)" for _, t in rows], padding=3, fontsize=8
    )
    ax.set_yticks(
        ys, [names.get(n, n.replace("region@", "region, ") + " proposals") for n, _ in rows], fontsize=8
    )
    ax.set_xscale("log")
    ax.set_xlim(right=max(t for _, t in rows) * 1000 * 20)
    a = bench.get("args", {})
    ax.set_xlabel("milliseconds per image (log scale)")
    size = "/".join(map(str, a.get("size", []))) or "?"
    ax.set_title(
        f"Extraction time, grid vs region: {a.get('arch', '?')}, shorter/longer side {size} px, "
        f"{a.get('images', '?')} images, {a.get('device', '?')}",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3, which="both")
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def extraction_markdown(bench: Mapping[str, Any], level: int = 2) -> str:
    res = bench.get("results", {})
    grid = res.get("grid")
    grid_t = grid["seconds"] / grid["images"] if grid and grid.get("images") else None
    a = bench.get("args", {})
    cmd = "python -m gridvqa.benchmarks.extraction " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in a.items()
        if k in ("arch", "size", "images", "batch", "workers", "device", "proposals")
    )
    lines = [
        f"{'#' * level} Extraction time: grid vs region",
        "",
        f"`{cmd}`: the same backbone (random weights: timing only), images and resize for every row.",
        "",
        "| | images/s | ms per image | × grid | |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    names = {"backbone": "bare backbone forward (no I/O)", "grid": "grid extraction"}
    for n, r in res.items():
        if not r.get("images"):
            continue
        t = r["seconds"] / r["images"]
        extra = ""
        if "res5_regions_per_image" in r:
            extra = f"res5 on {r['res5_regions_per_image']:.0f} regions per image"
        ratio = f"{t / grid_t:.1f}x" if grid_t else "–"
        label = names.get(n, n.replace("region@", "region extraction, ") + " proposals")
        lines.append(f"| {label} | {r['images_per_s']:.2f} | {t * 1000:.1f} | {ratio} | {extra} |")
    return "\n".join(lines) + "\n"


def _feature_images(path: Path) -> int | None:
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return int(f["image_ids"].shape[0])
    except Exception:  # noqa: BLE001 - a figure for the table only
        return None


def _runs(opts: Options) -> dict[str, list[RunRecord]]:
    """The finished runs of each planned setting over the planned seeds."""
    return {
        s.name: [
            load_run(p) for seed in opts.seeds if (p := opts.run_dir(s.name, seed) / "metrics.json").is_file()
        ]
        for s in opts.settings
    }


def _accuracy_section(opts: Options, runs: Mapping[str, list[RunRecord]], prior: float | None) -> list[str]:
    seeds = ",".join(map(str, opts.seeds))
    out = [
        "# Reproducing the paper's findings on the built-in data",
        "",
        f"`python -m gridvqa.reproduce` (`make reproduce`): {len(opts.settings)} VQA settings x "
        f"{len(opts.seeds)} seeds ({seeds}) on the built-in data, validation split. VQA accuracy is the "
        "official metric in percent, mean ± sample standard deviation over the seeds.",
        "",
        "## Accuracy per setting",
        "",
        "| setting | what it is | val VQA acc | yes/no | number | other | runs | minutes per run |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in opts.settings:
        rs = runs[s.name]
        per_type = [_pm(_stats(rs, f"{METRIC}_{t}")) for t in ANSWER_TYPES]
        minutes = stat([r.minutes for r in rs if r.minutes is not None])
        out.append(
            f"| `{s.name}` | {s.about} | **{_pm(_stats(rs, METRIC))}** | {' | '.join(per_type)} | "
            f"{len(rs)} | {f'{minutes.mean:.1f}' if minutes else '–'} |"
        )
    if prior is not None:
        out.append("| blind prior | best answer per question string (generator's stats.json) | "
                   f"{prior:.2f} | | | | | |")  # fmt: skip
    out += ["", "![VQA accuracy per setting](report.png)", "", _recipe_line(opts)]
    common = merge_overrides(opts.train_overrides, opts.vqa_overrides)
    if common:
        out.append(f"Every VQA run also: {_code(common)}.")
    own = [f"`{s.name}`: {_code(s.overrides)}" for s in opts.settings if s.overrides]
    if own:
        out.append("Per setting: " + "; ".join(own) + ".")
    for s in opts.settings:
        if s.init_from:
            out.append(
                f"`{s.name}` starts from the `{s.init_from}` model of the same seed, so it has trained for "
                "that run's epochs and its own."
            )
    out += ["Per-run figures: [report.md](report.md), [report.csv](report.csv).", ""]
    return out


def _question_type_accuracy(opts: Options) -> dict[str, dict[str, list[float]]]:
    """{setting: {question type: accuracy of each evaluated seed}} from the runs' official accuracy files."""
    out: dict[str, dict[str, list[float]]] = {}
    for s in opts.settings:
        per_type: dict[str, list[float]] = {}
        for seed in opts.seeds:
            path = opts.eval_accuracy(s.name, seed)
            if not path.is_file():
                continue
            try:
                scores = json.loads(path.read_text(encoding="utf-8"))["perQuestionType"]
                for qtype, acc in scores.items():
                    per_type.setdefault(str(qtype), []).append(float(acc))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{path}: not an accuracy file of the official scorer ({e})") from None
        out[s.name] = per_type
    return out


def _question_type_section(opts: Options) -> list[str]:
    """Accuracy per question type (rows) and setting (columns), mean ± std over the evaluated seeds."""
    if not opts.evaluate:
        return []
    acc = _question_type_accuracy(opts)
    qtypes = sorted({q for per_type in acc.values() for q in per_type})
    if not qtypes:
        return []
    names = [s.name for s in opts.settings]
    out = [
        "## Accuracy per question type",
        "",
        "The official scorer (`python -m gridvqa.evaluate split=val`) on each run's final model, mean ± "
        "standard deviation over the seeds; the question types are those of the annotations file.",
        "",
        "| question type | " + " | ".join(f"`{n}`" for n in names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for q in qtypes:
        cells = [_pm(stat(acc[n][q])) if acc[n].get(q) else "–" for n in names]
        out.append(f"| {q} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _recipe_line(opts: Options) -> str:
    files = _code(f"experiment={s.experiment}" for s in opts.settings)
    if opts.recipe:
        return f"Experiment files (conf/experiment/{opts.recipe}/, `recipe={opts.recipe}`): {files}."
    return f"Experiment files (conf/experiment/, as they are: `recipe=null`): {files}."


def _verdicts(
    opts: Options, acc: Mapping[str, Stat | None], bench: Mapping[str, Any] | None
) -> list[Verdict]:
    exp = opts.expect
    verdicts = [
        compare_better(a, acc.get(a), b, acc.get(b))
        for a, b in exp.get("better", [])
        if opts.setting(a) and opts.setting(b)
    ]
    g, r = exp.get("grid"), exp.get("region")
    if g and r and opts.setting(g) and opts.setting(r):
        verdicts.append(compare_close(g, acc.get(g), r, acc.get(r), float(exp.get("points", 2.0))))
    if opts.bench is not None:
        verdicts.append(compare_cost(bench, float(exp.get("cost_ratio", 2.0))))
    return verdicts


def _findings_section(
    verdicts: Sequence[Verdict], acc: Mapping[str, Stat | None], prior: float | None
) -> list[str]:
    measured = [v for v in verdicts if v.holds is not None]
    out = [
        "## The paper's findings in this run",
        "",
        "| expected | measured | holds? |",
        "| --- | --- | --- |",
        *[f"| {v.claim} | {v.measured} | {v.answer} |" for v in verdicts],
        "",
        f"{sum(bool(v.holds) for v in measured)} of {len(measured)} hold in this run"
        + (f"; {len(verdicts) - len(measured)} not measured." if len(measured) < len(verdicts) else "."),
        "A gap is beyond the seeds' spread when it exceeds twice the standard error of the difference "
        "of the two means.",
    ]
    means = {k: v.mean for k, v in acc.items() if v is not None}
    if means and prior is not None:
        best = max(means, key=means.get)
        spread = max(means.values()) - min(means.values())
        out.append(
            f"The best setting, `{best}`, scores {means[best]:.1f}: {means[best] - prior:+.1f} points "
            f"against the blind prior ({prior:.1f}); the settings span {spread:.1f} points."
        )
    out.append("")
    return out


def _extraction_section(opts: Options, bench: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []
    if bench is not None:
        out.append(extraction_markdown(bench, level=2))
        out += ["![Extraction time per image, grid vs region](extraction.png)", ""]
    recorded = read_steps(opts.results_dir)
    full = []
    for kind in opts.extract_kinds:
        for split in opts.extract_splits:
            rec = recorded.get(f"extract {kind} {split}")
            n = _feature_images(opts.data_root / "features" / f"{kind}_{split}.h5")
            if rec and n:
                full.append(f"{kind} {split}: {n} images in {rec['minutes']:.1f} min")
    if full:
        out += [
            "Whole splits with the pre-trained detectors in this reproduction (wall clock, process start "
            f"included; region with {_code(opts.extract_kind_overrides.get('region', []))}): "
            + "; ".join(full) + ".",
            "",
        ]  # fmt: skip
    return out


def _steps_section(opts: Options) -> list[str]:
    recorded = read_steps(opts.results_dir)
    out = ["## Steps", "", "| step | minutes (wall clock of its last run) |", "| --- | ---: |"]
    total = 0.0
    for label, names in step_rows(opts):
        got = [float(recorded[n].get("minutes", 0.0)) for n in names if n in recorded]
        if not got:
            out.append(f"| {label} | – (made outside reproduce, reused) |")
            continue
        total += sum(got)
        out.append(f"| {label} | {sum(got):.1f}{'' if len(got) == len(names) else ' (part)'} |")
    out += [f"| total | {total:.1f} |", ""]
    return out


def render_results(opts: Options) -> str:
    """results.md: accuracy per setting, the findings and whether each holds, extraction cost, steps."""
    runs = _runs(opts)
    acc = {name: _stats(rs, METRIC) for name, rs in runs.items()}
    bench = _load_bench(opts)
    prior = _blind_prior(opts.data_root)
    out = _accuracy_section(opts, runs, prior)
    out += _question_type_section(opts)
    out += _findings_section(_verdicts(opts, acc, bench), acc, prior)
    out += _extraction_section(opts, bench)
    out += _steps_section(opts)
    return "\n".join(out)


def step_rows(opts: Options) -> list[tuple[str, list[str]]]:
    """The steps.json names of each row of the steps table, in plan order; a setting's seeds in one row."""
    rows = [("data", ["data"])] if opts.data_root else []
    rows += [(f"pretrain {n}", [f"pretrain {n}"]) for n in opts.pretrain]
    rows += [
        (f"extract {k} {s}", [f"extract {k} {s}"]) for k in opts.extract_kinds for s in opts.extract_splits
    ]
    rows += [
        (f"train {s.name} ({len(opts.seeds)} seeds)", [f"train {s.name} seed {seed}" for seed in opts.seeds])
        for s in opts.settings
    ]
    if opts.evaluate:
        rows += [
            (f"evaluate {s.name} ({len(opts.seeds)} seeds)",
             [f"evaluate {s.name} seed {seed}" for seed in opts.seeds])
            for s in opts.settings
        ]  # fmt: skip
    if opts.bench is not None:
        rows.append(("bench", ["bench"]))
    return rows


def write_results(opts: Options) -> dict[str, Path]:
    """report.md/csv/png of every planned run, extraction figures and results.md into results_dir."""
    records = [
        load_run(p)
        for s in opts.settings
        for seed in opts.seeds
        if (p := opts.run_dir(s.name, seed) / "metrics.json").is_file()
    ]
    if not records:
        raise DataError(f"{opts.runs_dir}: no finished VQA run to report")
    out = opts.results_dir
    report = summarize(records, ignore=PLUMBING + ("paths.data_root", "paths.log_dir", "paths.artifacts_dir"),
                       sweep_dir=rel(opts.runs_dir))  # fmt: skip
    written = {path.name: path for path in write_report_files(report, out).values()}
    bench = _load_bench(opts)
    if bench is not None:
        written["extraction.md"] = atomic_write_text(
            out / "extraction.md", extraction_markdown(bench, level=1)
        )
        png = plot_extraction(bench, out / "extraction.png")
        if png is not None:
            written["extraction.png"] = png
    written[RESULTS_FILE] = atomic_write_text(out / RESULTS_FILE, render_results(opts))
    return written


# ---------------------------------------------------------------------------------------------
# the results block of `readme` (docs/results.md by default)


def for_readme(results_md: str, link_prefix: str, level: int) -> str:
    """results.md as a block of another Markdown file: its title dropped (the file has its own heading),
    its sections moved down to `level`, its relative links pointing from that file's folder."""
    lines = results_md.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
        while lines and not lines[0].strip():
            lines = lines[1:]
    out, fenced = [], False
    shift = max(level - 2, 0)
    link = re.compile(r"(\]\()(?!https?:|/|#)([^)\s]+)(\))")
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            if line.startswith("#"):
                line = "#" * shift + line
            if link_prefix:
                line = link.sub(lambda m: f"{m.group(1)}{link_prefix}{m.group(2)}{m.group(3)}", line)
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def _block_span(text: str, path: Path) -> tuple[int, int]:
    """Start and end (character offsets) of the text between the markers."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ConfigError(
            f"{path}: needs exactly one {BEGIN} and one {END} line for the results (or readme=null)"
        )
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if end < start:
        raise ConfigError(f"{path}: {END} comes before {BEGIN}")
    return start, end


def read_block(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file for the results block ({e.strerror})") from None
    start, end = _block_span(text, path)
    return text[start:end]


def replace_block(text: str, block: str, path: Path) -> str:
    start, end = _block_span(text, path)
    return text[:start] + "\n" + block.strip("\n") + "\n" + text[end:]


def readme_block(opts: Options) -> str:
    assert opts.readme is not None
    results = opts.results_dir / RESULTS_FILE
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    prefix = Path(os.path.relpath(opts.results_dir, opts.readme.parent)).as_posix() + "/"
    level = _readme_level(opts.readme)
    return for_readme(text, "" if prefix == "./" else prefix, level)


def _readme_level(path: Path) -> int:
    """Sections of the block sit one level below the heading the block is under."""
    level, fenced = 1, False
    for line in path.read_text(encoding="utf-8").split(BEGIN)[0].splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#+) ", line)):
            level = len(m.group(1))
    return min(level + 1, 6)


def write_readme(opts: Options) -> Path:
    assert opts.readme is not None
    text = opts.readme.read_text(encoding="utf-8")
    return atomic_write_text(opts.readme, replace_block(text, readme_block(opts), opts.readme))
