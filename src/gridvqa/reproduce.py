"""`python -m gridvqa.reproduce [overrides]` (`make reproduce`): the paper's findings on the built-in data.

Steps, in order (config: conf/reproduce.yaml):

    data        the built-in data set, when the data root has none
    pretrain    VG pre-training of the grid and the C4 detector       -> artifacts/reproduce/<name>/
    extract     grid and region features of train and val             -> DATA_ROOT/features/<kind>_<split>.h5
    train       one Hydra multirun per setting over the seeds         -> <runs_dir>/<setting>/seed_<n>/
                (frozen_random, frozen, region, finetune, e2e; finetune starts from its seed's frozen run)
    bench       scripts/bench_extraction.py                           -> <results>/extraction_bench.json
    report      report.md/csv/png, extraction.png/md, results.md      -> <results>/
    readme      results.md into README.md's <!-- reproduce:begin --> ... <!-- reproduce:end --> block

A step runs only when its output is missing, incomplete, made with other settings, or older than an input
that changed or is remade in this run (as make does); otherwise it prints "skip: ...", so an interrupted
reproduce resumes. Interrupted training runs resume from their last.ckpt (`ckpt_path=last`); a run folder
made with other settings is moved to <runs_dir>/stale/ first.

Every step is a subprocess (the real entry points), so this module only plans, runs and reports: it
imports neither torch nor Lightning.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridvqa.config import REPO_ROOT, conf_dir, register_resolvers
from gridvqa.data import layout
from gridvqa.data.jsonio import atomic_write_bytes, atomic_write_json, atomic_write_text
from gridvqa.errors import ConfigError, DataError, GridVQAError
from gridvqa.reporting import (
    RunRecord,
    Stat,
    load_run,
    override_key,
    stat,
    summarize,
    write_report_files,
)

BEGIN = "<!-- reproduce:begin -->"
END = "<!-- reproduce:end -->"
METRIC = "val/vqa_acc"
ANSWER_TYPES = ("yes_no", "number", "other")
STEPS_FILE = "steps.json"
BENCH_FILE = "extraction_bench.json"
RESULTS_FILE = "results.md"
# What a pre-training exports (config.json last: its presence means the export finished).
EXPORTED = ("backbone.safetensors", "detector.safetensors", "config.json")
# The detector whose weights each feature kind is extracted with (conf/extract.yaml).
EXTRACTOR = {"grid": "pretrain_vg", "region": "pretrain_vg_c4"}
# Overrides that say where things are or how a run is resumed, not what it computes: left out when
# deciding whether a finished step was made with the same settings, and out of the report's groups.
PLUMBING = ("seed", "ckpt_path", "model.init_from", "callbacks.publish_checkpoint.path")


# ---------------------------------------------------------------------------------------------
# configuration


def _as_list(value: Any, what: str) -> list[str]:
    """A list of overrides, or one string of them separated by spaces (shell quoting rules)."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ConfigError(f"{what}: expected a list or a string of overrides, got {value!r}")


def merge_overrides(*groups: Iterable[str]) -> list[str]:
    """Hydra overrides in order, a later one replacing an earlier one of the same key (Hydra itself
    refuses a key given twice)."""
    out: dict[str, str] = {}
    for group in groups:
        for o in group:
            out.pop(override_key(o), None)
            out[override_key(o)] = o
    return list(out.values())


_PLAIN = re.compile(r"[A-Za-z0-9_./:+-]*")


def kv(key: str, value: Any) -> str:
    """`key=value` for a Hydra command line, quoting values the override grammar would misread."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return f"{key}={text}"
    # Hydra's quoted strings: backslashes are literal except those before a quote or the closing quote
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return f"{key}='" + text.replace("'", "\\'") + "'"


# keys of conf/reproduce.yaml that hold override (or argument) lists
_LIST_KEY = re.compile(r"(^|\.)[a-z_]*overrides(\.|$)|^extract\.(grid|region)$|^data\.\w+_args$")


def _quote_list_overrides(arg: str) -> str:
    """`vqa_overrides=trainer.max_epochs=1` -> `vqa_overrides='trainer.max_epochs=1'`: an override
    list given as a plain string on the command line (Hydra's grammar rejects the bare `=`)."""
    key, sep, value = arg.partition("=")
    if not sep or not _LIST_KEY.search(key.lstrip("+~")) or value[:1] in ("[", "'", '"', ""):
        return arg
    return kv(key, value) if "=" in value or " " in value else arg


def load_config(overrides: Sequence[str] = ()) -> Any:
    """conf/reproduce.yaml composed with `overrides` (Hydra's override syntax)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("reproduce", overrides=[_quote_list_overrides(o) for o in overrides])


@dataclass
class SettingDef:
    name: str
    experiment: str
    about: str
    overrides: list[str]
    inputs: list[Path]
    init_from: str | None


@dataclass
class Options:
    """conf/reproduce.yaml, resolved and checked."""

    data_root: Path
    log_dir: Path
    artifacts_dir: Path
    runs_dir: Path
    results_dir: Path
    readme: Path | None
    seeds: list[int]
    dry_run: bool
    make_data: bool
    synthetic_args: list[str]
    prepare_args: list[str]
    train_overrides: list[str]
    pretrain: list[str]
    pretrain_overrides: dict[str, list[str]]
    extract_kinds: list[str]
    extract_splits: list[str]
    extract_overrides: list[str]
    extract_kind_overrides: dict[str, list[str]]
    vqa_overrides: list[str]
    settings: list[SettingDef]
    bench: dict[str, Any] | None
    expect: dict[str, Any]
    python: str = sys.executable

    @classmethod
    def from_cfg(cls, cfg: Any) -> Options:
        from omegaconf import OmegaConf

        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        if "output_dir" in cfg.paths:  # ${hydra:...}: only inside a Hydra job, and not needed here
            del cfg.paths["output_dir"]
        c = OmegaConf.to_container(cfg, resolve=True)
        paths = c["paths"]

        def path(x: Any) -> Path:
            return Path(str(x)).expanduser().absolute()

        seeds = c.get("seeds") or []
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must differ from each other, got {seeds}")
        experiments = {p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml")}
        defs = c.get("setting") or {}
        chosen = _as_list(c.get("settings"), "settings")
        settings: list[SettingDef] = []
        for name in chosen:
            d = defs.get(name)
            if not isinstance(d, dict):
                raise ConfigError(
                    f"settings: {name!r} is not defined under `setting:` (known: {', '.join(defs)})"
                )
            exp = d.get("experiment", name)
            if exp not in experiments:
                raise ConfigError(f"setting.{name}.experiment: no conf/experiment/{exp}.yaml")
            init = d.get("init_from")
            if init is not None and init not in chosen[: chosen.index(name)]:
                raise ConfigError(
                    f"setting.{name}.init_from={init!r}: that setting must be in `settings` before {name!r}"
                )
            settings.append(
                SettingDef(
                    name=name,
                    experiment=exp,
                    about=str(d.get("about") or ""),
                    overrides=_as_list(d.get("overrides"), f"setting.{name}.overrides"),
                    inputs=[path(p) for p in d.get("inputs") or []],
                    init_from=init,
                )
            )
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"settings lists a setting twice: {chosen}")
        for name in _as_list(c.get("pretrain"), "pretrain"):
            if name not in experiments:
                raise ConfigError(f"pretrain: no conf/experiment/{name}.yaml")
        ex = c.get("extract") or {}
        kinds = _as_list(ex.get("kinds"), "extract.kinds")
        bad = [k for k in kinds if k not in EXTRACTOR]
        if bad:
            raise ConfigError(f"extract.kinds: {bad[0]!r} is not one of {', '.join(EXTRACTOR)}")
        splits = _as_list(ex.get("splits"), "extract.splits")
        for s in splits:
            layout.official_split(s)
        bench = c.get("bench") or {}
        data = c.get("data") or {}
        po = c.get("pretrain_overrides") or {}
        return cls(
            data_root=path(paths["data_root"]),
            log_dir=path(paths["log_dir"]),
            artifacts_dir=path(paths["artifacts_dir"]),
            runs_dir=path(c["runs_dir"]),
            results_dir=path(c["results_dir"]),
            readme=path(c["readme"]) if c.get("readme") else None,
            seeds=list(seeds),
            dry_run=bool(c.get("dry_run")),
            make_data=bool(data.get("make", True)),
            synthetic_args=_as_list(data.get("synthetic_args"), "data.synthetic_args"),
            prepare_args=_as_list(data.get("prepare_args"), "data.prepare_args"),
            train_overrides=_as_list(c.get("train_overrides"), "train_overrides"),
            pretrain=_as_list(c.get("pretrain"), "pretrain"),
            pretrain_overrides={k: _as_list(v, f"pretrain_overrides.{k}") for k, v in po.items()},
            extract_kinds=kinds,
            extract_splits=splits,
            extract_overrides=_as_list(ex.get("overrides"), "extract.overrides"),
            extract_kind_overrides={k: _as_list(ex.get(k), f"extract.{k}") for k in EXTRACTOR},
            vqa_overrides=_as_list(c.get("vqa_overrides"), "vqa_overrides"),
            settings=settings,
            bench=bench if bench.get("enabled", True) else None,
            expect=c.get("expect") or {},
        )

    def paths_overrides(self) -> list[str]:
        return [
            kv("paths.data_root", self.data_root),
            kv("paths.log_dir", self.log_dir),
            kv("paths.artifacts_dir", self.artifacts_dir),
        ]

    def setting(self, name: str) -> SettingDef | None:
        return next((s for s in self.settings if s.name == name), None)

    def run_dir(self, setting: str, seed: int) -> Path:
        return self.runs_dir / setting / f"seed_{seed}"

    def published(self, setting: str, seed: int) -> Path:
        """Where a VQA run's checkpoint is published (one per seed: finetune reads its seed's)."""
        return self.artifacts_dir / setting / f"seed_{seed}" / "model.ckpt"


# ---------------------------------------------------------------------------------------------
# comparing settings


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


# ---------------------------------------------------------------------------------------------
# planning


@dataclass
class Step:
    """One unit of work: runs when `reason` is set, else is skipped (`note` says why)."""

    name: str
    kind: str  # data | pretrain | extract | train | bench | report | readme
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

    @property
    def runs(self) -> bool:
        return self.reason is not None


def _mtime(p: Path) -> int | None:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return None


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _changed_input(step: Step, remade: set[Path]) -> str | None:
    """Why `step`'s existing outputs are out of date with its inputs, if they are (make's rule)."""
    for p in step.inputs:
        if p in remade:
            return f"{_rel(p)} is remade"
    made = [m for m in (_mtime(o) for o in step.outputs) if m is not None]
    if not made:
        return None
    oldest = min(made)
    for p in step.inputs:
        m = _mtime(p)
        if m is not None and m > oldest:
            return f"{_rel(p)} is newer"
    return None


def read_steps(results_dir: Path) -> dict[str, dict[str, Any]]:
    """steps.json: per step, the minutes and settings of its last run (empty when absent or corrupt)."""
    try:
        data = json.loads((results_dir / STEPS_FILE).read_text(encoding="utf-8"))
        steps = data["steps"]
        return steps if isinstance(steps, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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


def _bench_args(opts: Options) -> list[str]:
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


def bench_script() -> Path:
    return REPO_ROOT / "scripts" / "bench_extraction.py"


def report_outputs(opts: Options) -> list[Path]:
    out = [opts.results_dir / n for n in ("report.md", "report.csv", "report.png", RESULTS_FILE)]
    if opts.bench is not None:
        out += [opts.results_dir / "extraction.png", opts.results_dir / "extraction.md"]
    return out


def _pretrain_input(opts: Options) -> Path:
    return opts.data_root / "vg" / "objects.json"


def plan(opts: Options) -> list[Step]:
    """Every step with its decision (run and why, or skip and why), from what is on disk."""
    py = opts.python
    steps: list[Step] = []
    remade: set[Path] = set()
    recorded = read_steps(opts.results_dir)

    def add(step: Step) -> None:
        steps.append(step)
        if step.runs:
            remade.update(step.outputs)

    def recorded_differs(step: Step) -> bool:
        old = recorded.get(step.name, {}).get("signature")
        return old is not None and step.signature is not None and old != step.signature

    # data
    root = opts.data_root
    questions = {s: layout.questions_path(root, s) for s in ("train", "val")}
    answers = root / "answers.json"
    data = Step("data", "data", outputs=[*questions.values(), answers])
    if answers.is_file():
        data.note = f"{_rel(answers)} exists"
    elif not opts.make_data:
        raise ConfigError(f"{answers}: no data (make it with `make data`, or set data.make=true)")
    elif all(q.is_file() for q in questions.values()):
        data.reason = "no answers.json yet"
        data.commands.append([py, "-m", "gridvqa.data.prepare", str(root), *opts.prepare_args])
    else:
        data.reason = "no data yet"
        data.commands.append([py, "-m", "gridvqa.data.synthetic", str(root), *opts.synthetic_args])
        data.commands.append([py, "-m", "gridvqa.data.prepare", str(root), *opts.prepare_args])
    add(data)

    # VG pre-training
    for name in opts.pretrain:
        ovr = merge_overrides(
            [f"experiment={name}"], opts.train_overrides, opts.pretrain_overrides.get(name, [])
        )
        run_dir = opts.runs_dir / name
        step = Step(
            f"pretrain {name}",
            "pretrain",
            outputs=[opts.artifacts_dir / name / f for f in EXPORTED],
            inputs=[_pretrain_input(opts)],
            signature=signature(ovr),
        )
        step.commands.append(
            [
                py, "-m", "gridvqa.train", *ovr, *opts.paths_overrides(), "ckpt_path=last",
                kv("hydra.run.dir", run_dir),
            ]
        )  # fmt: skip
        stored = _stored_overrides(run_dir)
        if not all(o.is_file() for o in step.outputs):
            step.reason = "no exported weights yet"
            if (
                stored is not None
                and signature(stored) == step.signature
                and not _changed_input(step, remade)
            ):
                step.reason += "; resumes the interrupted run"
            elif stored is not None:
                step.move_aside = run_dir
        elif changed := _changed_input(step, remade):
            step.reason, step.move_aside = changed, run_dir
        elif recorded_differs(step):
            step.reason, step.move_aside = "made with other settings", run_dir
        elif step.name in recorded:
            step.note = f"{_rel(opts.artifacts_dir / name)} has its exported weights"
        else:
            step.note = (
                f"{_rel(opts.artifacts_dir / name)} has exported weights, made outside reproduce: reused"
            )
        add(step)

    # feature extraction
    for kind in opts.extract_kinds:
        for split in opts.extract_splits:
            output = root / "features" / f"{kind}_{split}.h5"
            ovr = merge_overrides(
                [f"kind={kind}", f"split={split}"], opts.extract_overrides, opts.extract_kind_overrides[kind]
            )
            step = Step(
                f"extract {kind} {split}",
                "extract",
                outputs=[output],
                inputs=[
                    opts.artifacts_dir / EXTRACTOR[kind] / "config.json",
                    layout.questions_path(root, split),
                ],
                signature=signature(ovr),
            )
            overwrite = False
            if not output.exists():
                step.reason = "not extracted yet"
            elif changed := _changed_input(step, remade):
                step.reason, overwrite = f"{changed}: extracted afresh", True
            elif recorded_differs(step):
                step.reason, overwrite = "made with other settings: extracted afresh", True
            elif gap := extraction_gap(output, root, split):
                step.reason, overwrite = gap, gap.startswith("unreadable")
            else:
                step.note = f"{_rel(output)} is complete"
            step.commands.append(
                [
                    py, "-m", "gridvqa.extract", *ovr, *opts.paths_overrides(),
                    kv("hydra.run.dir", opts.runs_dir / "extract" / f"{kind}_{split}"),
                    *(["overwrite=true"] if overwrite else []),
                ]
            )  # fmt: skip
            add(step)

    # VQA training: setting-major, so a setting's seeds share one multirun and finetune follows frozen
    needed = {s.init_from for s in opts.settings if s.init_from}
    for s in opts.settings:
        common = merge_overrides(
            [f"experiment={s.experiment}"], opts.train_overrides, opts.vqa_overrides, s.overrides
        )
        publish = "${paths.artifacts_dir}/" + s.name + "/seed_${seed}/model.ckpt"
        init = "${paths.artifacts_dir}/" + str(s.init_from) + "/seed_${seed}/model.ckpt"
        for seed in opts.seeds:
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
            inputs = [answers, *s.inputs]
            if s.init_from:
                inputs.append(opts.published(s.init_from, seed))
            step = Step(
                f"train {s.name} seed {seed}",
                "train",
                outputs=outputs,
                inputs=inputs,
                setting=s.name,
                seed=seed,
                overrides=ovr,
                signature=signature(ovr),
            )
            stored = _stored_overrides(run_dir)
            if stored is not None and signature(stored) != step.signature:
                step.reason, step.move_aside = "made with other settings", run_dir
            elif stored is None and not outputs[0].is_file():
                step.reason = "not run yet"
            elif changed := _changed_input(step, remade):
                step.reason = changed
                step.move_aside = run_dir if run_dir.exists() else None
            elif not outputs[0].is_file():
                step.reason = "resumes the interrupted run"
            elif missing := [o for o in outputs if not o.is_file()]:
                step.reason, step.move_aside = f"{_rel(missing[0])} is missing", run_dir
            else:
                step.note = f"{_rel(outputs[0])} exists"
            add(step)

    # extraction benchmark
    if opts.bench is not None:
        script = bench_script()
        if not script.is_file():
            raise ConfigError(
                f"{script}: not found (the benchmark needs the repository; bench.enabled=false)"
            )
        out = opts.results_dir / BENCH_FILE
        args = _bench_args(opts)
        step = Step("bench", "bench", outputs=[out], signature=args)
        step.commands.append([py, str(script), *args, "--json", str(out)])
        try:
            old_args = _bench_args_of(json.loads(out.read_text(encoding="utf-8"))["args"])
        except (OSError, ValueError, KeyError, TypeError):
            old_args = None
        if old_args is None:
            step.reason = "not run yet"
        elif old_args != args:
            step.reason = "made with other settings"
        else:
            step.note = f"{_rel(out)} exists"
        add(step)

    # report and README
    report = Step(
        "report",
        "report",
        outputs=report_outputs(opts),
        inputs=[st.outputs[0] for st in steps if st.kind in ("train", "bench")],
    )
    if any(st.runs for st in steps):
        report.reason = "new results"
    elif missing_out := [o for o in report.outputs if not o.is_file()]:
        report.reason = f"{_rel(missing_out[0])} is missing"
    elif changed := _changed_input(report, remade):
        report.reason = changed
    elif render_results(opts) != (opts.results_dir / RESULTS_FILE).read_text(encoding="utf-8"):
        report.reason = f"{_rel(opts.results_dir / RESULTS_FILE)} is out of date"
    else:
        report.note = f"{_rel(opts.results_dir / RESULTS_FILE)} is up to date"
    add(report)
    if opts.readme is not None:
        readme = Step("readme", "readme", outputs=[opts.readme], inputs=[opts.results_dir / RESULTS_FILE])
        current = read_block(opts.readme)  # fails now, not after hours of training, when markers are missing
        if report.runs:
            readme.reason = "results changed"
        elif current.strip() != readme_block(opts).strip():
            readme.reason = "its block differs from results.md"
        else:
            readme.note = f"the block in {_rel(opts.readme)} is results.md"
        add(readme)
    return steps


def _bench_args_of(stored: Mapping[str, Any]) -> list[str]:
    """The arguments a stored benchmark ran with, as _bench_args spells them."""
    return [
        "--arch", str(stored["arch"]),
        "--size", *[str(int(s)) for s in stored["size"]],
        "--images", str(int(stored["images"])),
        "--batch", str(int(stored["batch"])),
        "--workers", str(int(stored["workers"])),
        "--device", str(stored["device"]),
        "--proposals", *[str(int(p)) for p in stored["proposals"]],
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# running


class StepFailed(GridVQAError):
    """A step's command failed or did not make what it should have."""


def _run(cmd: list[str]) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, check=False).returncode


def _multirun_command(opts: Options, group: Sequence[Step]) -> list[str]:
    """One `python -m gridvqa.train -m` over the seeds of one setting that need a run."""
    first = group[0]
    ovr = [o for o in first.overrides if override_key(o) != "seed"]
    return [
        opts.python, "-m", "gridvqa.train", "-m", *ovr,
        "seed=" + ",".join(str(st.seed) for st in group),
        kv("hydra.sweep.dir", opts.runs_dir / first.setting),
        "hydra.sweep.subdir=seed_${seed}",
    ]  # fmt: skip


def _move_aside(opts: Options, run_dir: Path) -> Path:
    rel = run_dir.relative_to(opts.runs_dir) if run_dir.is_relative_to(opts.runs_dir) else Path(run_dir.name)
    stem = opts.runs_dir / "stale" / f"{'_'.join(rel.parts)}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, n = stem, 1
    while dest.exists():
        n += 1
        dest = stem.with_name(f"{stem.name}-{n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), dest)
    return dest


def _record(opts: Options, names: Sequence[str], minutes: float, sig: Mapping[str, list[str] | None]) -> None:
    data = read_steps(opts.results_dir)
    for name in names:
        data[name] = {
            "minutes": round(minutes / len(names), 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "signature": sig.get(name),
        }
    atomic_write_json(opts.results_dir / STEPS_FILE, {"format_version": 1, "steps": data}, indent=1)


def _say(text: str) -> None:
    print(f"[reproduce] {text}", flush=True)


def execute(opts: Options, steps: Sequence[Step]) -> list[str]:
    """Run the steps that need it, in order; returns the names of those that ran. Stops at the first
    failure with a StepFailed naming the step and its command."""
    units: list[list[Step]] = []  # the seeds of one setting train in one multirun
    for st in steps:
        last = units[-1][0] if units else None
        if st.kind == "train" and last is not None and last.kind == "train" and last.setting == st.setting:
            units[-1].append(st)
        else:
            units.append([st])
    ran: list[str] = []
    for unit in units:
        for st in unit:
            if not st.runs:
                _say(f"skip: {st.name} ({st.note})")
        group = [st for st in unit if st.runs]
        if not group:
            continue
        step = group[0]
        for st in group:
            _say(f"run: {st.name} ({st.reason})")
            if st.move_aside is not None and st.move_aside.exists():
                _say(f"  old run folder moved to {_rel(_move_aside(opts, st.move_aside))}")
        start = time.perf_counter()
        commands = [_multirun_command(opts, group)] if step.kind == "train" else step.commands
        if step.kind == "report":
            write_results(opts)
        elif step.kind == "readme":
            write_readme(opts)
        for cmd in commands:
            _say("$ " + shlex.join(cmd))
            rc = _run(cmd)
            if rc != 0:
                raise StepFailed(f"{step.name}: `{shlex.join(cmd)}` exited with status {rc}")
        for st in group:
            if missing := [o for o in st.outputs if not o.exists()]:
                raise StepFailed(f"{st.name}: finished but {missing[0]} was not made")
        if step.kind not in ("report", "readme"):
            minutes = (time.perf_counter() - start) / 60
            _record(opts, [st.name for st in group], minutes, {st.name: st.signature for st in group})
        ran += [st.name for st in group]
    return ran


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
    cmd = "python scripts/bench_extraction.py " + " ".join(
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


def render_results(opts: Options) -> str:
    """results.md: accuracy per setting, the findings and whether each holds, extraction cost, steps."""
    runs: dict[str, list[RunRecord]] = {}
    for s in opts.settings:
        runs[s.name] = [
            load_run(p) for seed in opts.seeds if (p := opts.run_dir(s.name, seed) / "metrics.json").is_file()
        ]
    acc = {name: _stats(rs, METRIC) for name, rs in runs.items()}
    bench = _load_bench(opts)
    prior = _blind_prior(opts.data_root)
    exp = opts.expect
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
            f"| `{s.name}` | {s.about} | **{_pm(acc[s.name])}** | {' | '.join(per_type)} | {len(rs)} | "
            f"{f'{minutes.mean:.1f}' if minutes else '–'} |"
        )
    if prior is not None:
        out.append("| blind prior | best answer per question string (generator's stats.json) | "
                   f"{prior:.2f} | | | | | |")  # fmt: skip
    out += [
        "",
        "![VQA accuracy per setting](report.png)",
        "",
        f"Every VQA run: {_code(merge_overrides(opts.train_overrides, opts.vqa_overrides))}.",
    ]
    own = [f"`{s.name}`: {_code(s.overrides)}" for s in opts.settings if s.overrides]
    if own:
        out.append("Per setting: " + "; ".join(own) + ".")
    fine = [s for s in opts.settings if s.init_from]
    for s in fine:
        out.append(
            f"`{s.name}` starts from the `{s.init_from}` model of the same seed, so it has trained for that "
            "run's epochs and its own."
        )
    out += ["Per-run figures: [report.md](report.md), [report.csv](report.csv).", ""]

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
    measured = [v for v in verdicts if v.holds is not None]
    out += [
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

    out += ["## Steps", "", "| step | minutes (wall clock of its last run) |", "| --- | ---: |"]
    total = 0.0
    for label, names in step_rows(opts):
        got = [float(recorded[n].get("minutes", 0.0)) for n in names if n in recorded]
        if not got:
            out.append(f"| {label} | – (made outside reproduce, reused) |")
            continue
        total += sum(got)
        out.append(f"| {label} | {sum(got):.1f}{'' if len(got) == len(names) else ' (part)'} |")
    out += [f"| total | {total:.1f} |", ""]
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
                       sweep_dir=_rel(opts.runs_dir))  # fmt: skip
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
# README block


def for_readme(results_md: str, link_prefix: str, level: int) -> str:
    """results.md as a README block: its title dropped (the README has its own heading), its
    sections moved down to `level`, its relative links pointing from the README's folder."""
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
        raise ConfigError(f"{path}: cannot read the README ({e.strerror})") from None
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


# ---------------------------------------------------------------------------------------------
# entry point


def reproduce(overrides: Sequence[str] = ()) -> list[str]:
    """Plan and run; returns the names of the steps that ran (none on a dry run)."""
    opts = Options.from_cfg(load_config(overrides))
    steps = plan(opts)
    if opts.dry_run:
        for st in steps:
            _say(f"would run: {st.name} ({st.reason})" if st.runs else f"skip: {st.name} ({st.note})")
        return []
    ran = execute(opts, steps)
    _say(
        f"done: {len(ran)} step(s) ran, {len(steps) - len(ran)} skipped; results in {_rel(opts.results_dir)}"
    )
    return ran


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print("Overrides (Hydra syntax) of conf/reproduce.yaml, e.g. seeds=[1] dry_run=true")
        return 0
    try:
        reproduce(args)
    except KeyboardInterrupt:
        print("interrupted: the same command resumes where this one stopped", file=sys.stderr)
        return 130
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Hydra's override and composition errors: one line
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln[:1].isspace()]
            print(f"error: {' '.join(lines[:3])}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
