"""Planning: every step of a reproduction with its decision (run and why, or skip and why), from what is
on disk, as make decides: missing or incomplete outputs, other settings (steps.json and the runs' own
override records), or an input that is newer or remade in this run."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridvqa.data import layout
from gridvqa.errors import ConfigError, DataError
from gridvqa.reporting import override_key
from gridvqa.reproduce.options import (
    BENCH_FILE,
    EXPORTED,
    EXTRACTOR,
    PLUMBING,
    RESULTS_FILE,
    Options,
    kv,
    merge_overrides,
    read_steps,
    rel,
)
from gridvqa.reproduce.render import read_block, readme_block, render_results


def signature(overrides: Iterable[str]) -> list[str]:
    """What a set of overrides computes, comparable whatever Hydra did to their spelling (it re-renders
    them in a multirun): parsed values, plumbing and `paths.*` left out, sorted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for o in overrides:
        o = o.replace("$\\{", "${").replace("\\}", "}")  # a multirun records `${x}` as `$\{x\}`
        key = override_key(o)
        if key in PLUMBING or key.startswith(("paths.", "hydra.")):
            continue
        try:
            value = parser.parse_override(o).value()
        except Exception:  # noqa: BLE001 - an unparsable stored override: compare it as text
            value = o.partition("=")[2]
        out.append(f"{o.partition('=')[0]}={json.dumps(value, sort_keys=True, default=str)}")
    return sorted(out)


def _stored_overrides(run_dir: Path) -> list[str] | None:
    """The task overrides a run was started with (metrics.json when it finished, else Hydra's record)."""
    try:
        return list(json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["overrides"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import yaml

        data = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))
        return [str(o) for o in data] if isinstance(data, list) else None
    except (OSError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - yaml.YAMLError: a half-written file, as good as none
        return None


@dataclass
class Step:
    """One unit of work: runs when `reason` is set, else is skipped (`note` says why)."""

    name: str
    kind: str  # data | pretrain | extract | train | evaluate | bench | report | readme
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    reason: str | None = None
    note: str = ""
    signature: list[str] | None = None  # recorded in steps.json when it has run
    move_aside: Path | None = None  # an old run folder to move out of the way first
    setting: str | None = None
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)  # train: the job's task overrides
    run_dir: Path | None = None  # pretrain / train: the Hydra run folder

    @property
    def runs(self) -> bool:
        return self.reason is not None


def _mtime(p: Path) -> int | None:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return None


def _changed_input(step: Step, remade: set[Path]) -> str | None:
    """Why `step`'s existing outputs are out of date with its inputs, if they are (make's rule)."""
    for p in step.inputs:
        if p in remade:
            return f"{rel(p)} is remade"
    made = [m for m in (_mtime(o) for o in step.outputs) if m is not None]
    if not made:
        return None
    oldest = min(made)
    for p in step.inputs:
        m = _mtime(p)
        if m is not None and m > oldest:
            return f"{rel(p)} is newer"
    return None


def _split_image_ids(data_root: Path, split: str) -> set[int]:
    qpath = layout.questions_path(data_root, split)
    try:
        questions = json.loads(qpath.read_text(encoding="utf-8"))["questions"]
        return {int(q["image_id"]) for q in questions}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{qpath}: cannot read the split's questions ({e})") from None


def extraction_gap(output: Path, data_root: Path, split: str) -> str | None:
    """Why a feature file is not finished (None when it is): missing, interrupted (its parts folder is
    still there), or short of some image of the split that was not listed as unreadable."""
    if not output.is_file():
        return "not extracted yet"
    if output.with_name(output.name + ".parts").exists():
        return "interrupted (resumes)"
    import h5py

    try:
        with h5py.File(output, "r") as f:
            have = {int(i) for i in f["image_ids"][:]}
    except (OSError, KeyError) as e:
        return f"unreadable ({str(e).splitlines()[0]}): extracted afresh"
    skipped: set[int] = set()
    try:
        entries = json.loads(output.with_name(output.name + ".skipped.json").read_text(encoding="utf-8"))
        skipped = {int(e["image_id"]) for e in entries["skipped"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    missing = _split_image_ids(data_root, split) - have - skipped
    if missing:
        return f"{len(missing)} images of {split} missing (resumes)"
    return None


def bench_args(opts: Options) -> list[str]:
    b = opts.bench or {}
    size = [str(int(s)) for s in b.get("size", [192, 192])]
    return [
        "--arch", str(b.get("arch", "R-tiny")),
        "--size", *size,
        "--images", str(int(b.get("images", 8))),
        "--batch", str(int(b.get("batch", 1))),
        "--workers", str(int(b.get("workers", 0))),
        "--device", str(b.get("device", "cpu")),
        "--proposals", *[str(int(p)) for p in b.get("proposals", [1000, 100])],
    ]  # fmt: skip


def _bench_args_of(stored: Mapping[str, Any]) -> list[str]:
    """The arguments a stored benchmark ran with, as bench_args spells them."""
    return [
        "--arch", str(stored["arch"]),
        "--size", *[str(int(s)) for s in stored["size"]],
        "--images", str(int(stored["images"])),
        "--batch", str(int(stored["batch"])),
        "--workers", str(int(stored["workers"])),
        "--device", str(stored["device"]),
        "--proposals", *[str(int(p)) for p in stored["proposals"]],
    ]  # fmt: skip


def report_outputs(opts: Options) -> list[Path]:
    out = [opts.results_dir / n for n in ("report.md", "report.csv", "report.png", RESULTS_FILE)]
    if opts.bench is not None:
        out += [opts.results_dir / "extraction.png", opts.results_dir / "extraction.md"]
    return out


class _Planner:
    """The steps so far, the outputs remade by those that run, and steps.json's record."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.py = opts.python
        self.steps: list[Step] = []
        self.remade: set[Path] = set()
        self.recorded = read_steps(opts.results_dir)

    def add(self, step: Step) -> None:
        self.steps.append(step)
        if step.runs:
            self.remade.update(step.outputs)

    def recorded_differs(self, step: Step) -> bool:
        old = self.recorded.get(step.name, {}).get("signature")
        return old is not None and step.signature is not None and old != step.signature

    def changed_input(self, step: Step) -> str | None:
        return _changed_input(step, self.remade)


def _answers(opts: Options) -> Path:
    return opts.data_root / "answers.json"


def _plan_data(pl: _Planner) -> None:
    opts, root, py = pl.opts, pl.opts.data_root, pl.py
    questions = {s: layout.questions_path(root, s) for s in ("train", "val")}
    answers = _answers(opts)
    data = Step("data", "data", outputs=[*questions.values(), answers])
    if answers.is_file():
        data.note = f"{rel(answers)} exists"
    elif not opts.make_data:
        raise ConfigError(f"{answers}: no data (make it with `make data`, or set data.make=true)")
    elif all(q.is_file() for q in questions.values()):
        data.reason = "no answers.json yet"
        data.commands.append([py, "-m", "gridvqa.data.prepare", str(root), *opts.prepare_args])
    else:
        data.reason = "no data yet"
        data.commands.append([py, "-m", "gridvqa.data.synthetic", str(root), *opts.synthetic_args])
        data.commands.append([py, "-m", "gridvqa.data.prepare", str(root), *opts.prepare_args])
    pl.add(data)


def _plan_pretrain(pl: _Planner, name: str) -> None:
    opts = pl.opts
    ovr = merge_overrides(
        [f"experiment={opts.pretrain_experiments[name]}"],
        opts.train_overrides,
        opts.pretrain_overrides.get(name, []),
    )
    run_dir = opts.runs_dir / name
    step = Step(
        f"pretrain {name}",
        "pretrain",
        outputs=[opts.artifacts_dir / name / f for f in EXPORTED],
        inputs=[opts.data_root / "vg" / "objects.json"],
        signature=signature(ovr),
        run_dir=run_dir,
    )
    step.commands.append(
        [
            pl.py, "-m", "gridvqa.train", *ovr, *opts.paths_overrides(), "ckpt_path=last",
            kv("hydra.run.dir", run_dir),
        ]
    )  # fmt: skip
    stored = _stored_overrides(run_dir)
    if not all(o.is_file() for o in step.outputs):
        step.reason = "no exported weights yet"
        if stored is not None and signature(stored) == step.signature and not pl.changed_input(step):
            step.reason += "; resumes the interrupted run"
        elif stored is not None:
            step.move_aside = run_dir
    elif changed := pl.changed_input(step):
        step.reason, step.move_aside = changed, run_dir
    elif pl.recorded_differs(step):
        step.reason, step.move_aside = "made with other settings", run_dir
    elif step.name in pl.recorded:
        step.note = f"{rel(opts.artifacts_dir / name)} has its exported weights"
    else:
        step.note = f"{rel(opts.artifacts_dir / name)} has exported weights, made outside reproduce: reused"
    pl.add(step)


def _plan_extract(pl: _Planner, kind: str, split: str) -> None:
    opts, root = pl.opts, pl.opts.data_root
    output = root / "features" / f"{kind}_{split}.h5"
    ovr = merge_overrides(
        [f"kind={kind}", f"split={split}"], opts.extract_overrides, opts.extract_kind_overrides[kind]
    )
    step = Step(
        f"extract {kind} {split}",
        "extract",
        outputs=[output],
        inputs=[opts.artifacts_dir / EXTRACTOR[kind] / "config.json", layout.questions_path(root, split)],
        signature=signature(ovr),
    )
    overwrite = False
    if not output.exists():
        step.reason = "not extracted yet"
    elif changed := pl.changed_input(step):
        step.reason, overwrite = f"{changed}: extracted afresh", True
    elif pl.recorded_differs(step):
        step.reason, overwrite = "made with other settings: extracted afresh", True
    elif gap := extraction_gap(output, root, split):
        step.reason, overwrite = gap, gap.startswith("unreadable")
    else:
        step.note = f"{rel(output)} is complete"
    step.commands.append(
        [
            pl.py, "-m", "gridvqa.extract", *ovr, *opts.paths_overrides(),
            kv("hydra.run.dir", opts.runs_dir / "extract" / f"{kind}_{split}"),
            *(["overwrite=true"] if overwrite else []),
        ]
    )  # fmt: skip
    pl.add(step)


def _train_step(pl: _Planner, s: Any, seed: int, common: list[str], needed: set[str]) -> Step:
    opts = pl.opts
    publish = "${paths.artifacts_dir}/" + s.name + "/seed_${seed}/model.ckpt"
    init = "${paths.artifacts_dir}/" + str(s.init_from) + "/seed_${seed}/model.ckpt"
    run_dir = opts.run_dir(s.name, seed)
    ovr = [
        *common,
        *opts.paths_overrides(),
        f"callbacks.publish_checkpoint.path={publish}",
        *([f"model.init_from={init}"] if s.init_from else []),
        "ckpt_path=last",
        f"seed={seed}",
    ]
    outputs = [run_dir / "metrics.json"]
    if s.name in needed:
        outputs.append(opts.published(s.name, seed))
    inputs = [_answers(opts), *s.inputs]
    if s.init_from:
        inputs.append(opts.published(s.init_from, seed))
    return Step(
        f"train {s.name} seed {seed}",
        "train",
        outputs=outputs,
        inputs=inputs,
        setting=s.name,
        seed=seed,
        overrides=ovr,
        signature=signature(ovr),
        run_dir=run_dir,
    )


def _decide_train(pl: _Planner, step: Step) -> None:
    run_dir, metrics = step.run_dir, step.outputs[0]
    assert run_dir is not None
    stored = _stored_overrides(run_dir)
    if stored is not None and signature(stored) != step.signature:
        step.reason, step.move_aside = "made with other settings", run_dir
    elif stored is None and not metrics.is_file():
        step.reason = "not run yet"
    elif changed := pl.changed_input(step):
        step.reason = changed
        step.move_aside = run_dir if run_dir.exists() else None
    elif not metrics.is_file():
        step.reason = "resumes the interrupted run"
    elif missing := [o for o in step.outputs if not o.is_file()]:
        step.reason, step.move_aside = f"{rel(missing[0])} is missing", run_dir
    else:
        step.note = f"{rel(metrics)} exists"


def _plan_train(pl: _Planner) -> None:
    """Setting-major, so a setting's seeds share one multirun and finetune follows frozen; each setting's
    evaluations follow its runs."""
    opts = pl.opts
    needed = {s.init_from for s in opts.settings if s.init_from}
    for s in opts.settings:
        common = merge_overrides(
            [f"experiment={s.experiment}"], opts.train_overrides, opts.vqa_overrides, s.overrides
        )
        trains = []
        for seed in opts.seeds:
            step = _train_step(pl, s, seed, common, needed)
            _decide_train(pl, step)
            pl.add(step)
            trains.append(step)
        if opts.evaluate:  # right after the setting's runs: its figures are complete before the next starts
            for step in trains:
                pl.add(_evaluate_step(pl, step))


def _evaluate_step(pl: _Planner, tr: Step) -> Step:
    """The official scorer on a training run's final model (its last checkpoint), val split."""
    opts = pl.opts
    assert tr.run_dir is not None and tr.setting is not None and tr.seed is not None
    results = opts.eval_results(tr.setting, tr.seed)
    step = Step(
        f"evaluate {tr.setting} seed {tr.seed}",
        "evaluate",
        outputs=[opts.eval_accuracy(tr.setting, tr.seed)],
        inputs=[tr.outputs[0]],  # the run's metrics.json: rewritten when the run is
        setting=tr.setting,
        seed=tr.seed,
        run_dir=results.parent,
    )
    step.commands.append(
        [
            pl.py, "-m", "gridvqa.evaluate", kv("ckpt_path", tr.run_dir / "checkpoints" / "last.ckpt"),
            "split=val", kv("out", results), *opts.paths_overrides(), kv("hydra.run.dir", results.parent),
        ]
    )  # fmt: skip
    if not step.outputs[0].is_file():
        step.reason = "not evaluated yet"
    elif changed := pl.changed_input(step):
        step.reason = changed
    else:
        step.note = f"{rel(step.outputs[0])} exists"
    return step


def _plan_bench(pl: _Planner) -> None:
    opts = pl.opts
    out = opts.results_dir / BENCH_FILE
    args = bench_args(opts)
    step = Step("bench", "bench", outputs=[out], signature=args)
    step.commands.append([pl.py, "-m", "gridvqa.benchmarks.extraction", *args, "--json", str(out)])
    try:
        old_args = _bench_args_of(json.loads(out.read_text(encoding="utf-8"))["args"])
    except (OSError, ValueError, KeyError, TypeError):
        old_args = None
    if old_args is None:
        step.reason = "not run yet"
    elif old_args != args:
        step.reason = "made with other settings"
    else:
        step.note = f"{rel(out)} exists"
    pl.add(step)


def _plan_report(pl: _Planner) -> None:
    opts = pl.opts
    results = opts.results_dir / RESULTS_FILE
    report = Step(
        "report",
        "report",
        outputs=report_outputs(opts),
        inputs=[st.outputs[0] for st in pl.steps if st.kind in ("train", "evaluate", "bench")],
    )
    if any(st.runs for st in pl.steps):
        report.reason = "new results"
    elif missing_out := [o for o in report.outputs if not o.is_file()]:
        report.reason = f"{rel(missing_out[0])} is missing"
    elif changed := pl.changed_input(report):
        report.reason = changed
    elif render_results(opts) != results.read_text(encoding="utf-8"):
        report.reason = f"{rel(results)} is out of date"
    else:
        report.note = f"{rel(results)} is up to date"
    pl.add(report)
    if opts.readme is None:
        return
    readme = Step("readme", "readme", outputs=[opts.readme], inputs=[results])
    current = read_block(opts.readme)  # fails now, not after hours of training, when markers are missing
    if report.runs:
        readme.reason = "results changed"
    elif current.strip() != readme_block(opts).strip():
        readme.reason = "its block differs from results.md"
    else:
        readme.note = f"the block in {rel(opts.readme)} is results.md"
    pl.add(readme)


def plan(opts: Options) -> list[Step]:
    """Every step with its decision (run and why, or skip and why), from what is on disk."""
    pl = _Planner(opts)
    _plan_data(pl)
    for name in opts.pretrain:
        _plan_pretrain(pl, name)
    for kind in opts.extract_kinds:
        for split in opts.extract_splits:
            _plan_extract(pl, kind, split)
    _plan_train(pl)
    if opts.bench is not None:
        _plan_bench(pl)
    _plan_report(pl)
    return pl.steps
