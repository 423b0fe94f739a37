"""conf/reproduce.yaml, composed, resolved and checked (Options), and the override helpers every step's
command line is built with."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridvqa.config import compose_config, conf_dir
from gridvqa.data import layout
from gridvqa.errors import ConfigError
from gridvqa.metrics.vqa_eval import RESULTS_NAME, accuracy_path
from gridvqa.reporting import override_key

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
    return compose_config("reproduce", [_quote_list_overrides(o) for o in overrides])


@dataclass
class SettingDef:
    name: str
    experiment: str  # the experiment file it trains (the recipe's, when one is set)
    about: str
    overrides: list[str]
    inputs: list[Path]
    init_from: str | None


def _path(x: Any) -> Path:
    return Path(str(x)).expanduser().absolute()


def _experiments() -> set[str]:
    """Every `experiment=` name: conf/experiment/**/*.yaml relative to conf/experiment, without .yaml."""
    root = Path(conf_dir()) / "experiment"
    return {p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")}


def _experiment(name: str, recipe: str | None, known: set[str], what: str) -> str:
    """The experiment file `name` stands for: conf/experiment/<recipe>/<name>.yaml, or <name>.yaml."""
    exp = f"{recipe}/{name}" if recipe else name
    if exp not in known:
        raise ConfigError(f"{what}: no conf/experiment/{exp}.yaml")
    return exp


def _seeds(c: dict[str, Any]) -> list[int]:
    seeds = c.get("seeds") or []
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must differ from each other, got {seeds}")
    return list(seeds)


def _settings(c: dict[str, Any], recipe: str | None, known: set[str]) -> list[SettingDef]:
    defs = c.get("setting") or {}
    chosen = _as_list(c.get("settings"), "settings")
    settings: list[SettingDef] = []
    for name in chosen:
        d = defs.get(name)
        if not isinstance(d, dict):
            raise ConfigError(
                f"settings: {name!r} is not defined under `setting:` (known: {', '.join(defs)})"
            )
        exp = _experiment(str(d.get("experiment", name)), recipe, known, f"setting.{name}.experiment")
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
                inputs=[_path(p) for p in d.get("inputs") or []],
                init_from=init,
            )
        )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"settings lists a setting twice: {chosen}")
    return settings


def _extract_kinds(ex: dict[str, Any]) -> tuple[list[str], list[str]]:
    kinds = _as_list(ex.get("kinds"), "extract.kinds")
    bad = [k for k in kinds if k not in EXTRACTOR]
    if bad:
        raise ConfigError(f"extract.kinds: {bad[0]!r} is not one of {', '.join(EXTRACTOR)}")
    splits = _as_list(ex.get("splits"), "extract.splits")
    for s in splits:
        layout.official_split(s)
    return kinds, splits


def _jobs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"jobs must be a whole number of runs at once, 1 or more, got {value!r}")
    return value


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
    pretrain_experiments: dict[str, str]  # name -> the experiment file it trains
    pretrain_overrides: dict[str, list[str]]
    extract_kinds: list[str]
    extract_splits: list[str]
    extract_overrides: list[str]
    extract_kind_overrides: dict[str, list[str]]
    vqa_overrides: list[str]
    settings: list[SettingDef]
    bench: dict[str, Any] | None
    expect: dict[str, Any]
    recipe: str | None = None
    jobs: int = 1
    evaluate: bool = True  # the official scorer on each run's final model: accuracy per question type
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
        recipe = str(c["recipe"]).strip("/") if c.get("recipe") else None
        known = _experiments()
        settings = _settings(c, recipe, known)
        pretrain = _as_list(c.get("pretrain"), "pretrain")
        pretrain_experiments = {n: _experiment(n, recipe, known, "pretrain") for n in pretrain}
        ex = c.get("extract") or {}
        kinds, splits = _extract_kinds(ex)
        bench = c.get("bench") or {}
        data = c.get("data") or {}
        po = c.get("pretrain_overrides") or {}
        return cls(
            data_root=_path(paths["data_root"]),
            log_dir=_path(paths["log_dir"]),
            artifacts_dir=_path(paths["artifacts_dir"]),
            runs_dir=_path(c["runs_dir"]),
            results_dir=_path(c["results_dir"]),
            readme=_path(c["readme"]) if c.get("readme") else None,
            seeds=_seeds(c),
            dry_run=bool(c.get("dry_run")),
            make_data=bool(data.get("make", True)),
            synthetic_args=_as_list(data.get("synthetic_args"), "data.synthetic_args"),
            prepare_args=_as_list(data.get("prepare_args"), "data.prepare_args"),
            train_overrides=_as_list(c.get("train_overrides"), "train_overrides"),
            pretrain=pretrain,
            pretrain_experiments=pretrain_experiments,
            pretrain_overrides={k: _as_list(v, f"pretrain_overrides.{k}") for k, v in po.items()},
            extract_kinds=kinds,
            extract_splits=splits,
            extract_overrides=_as_list(ex.get("overrides"), "extract.overrides"),
            extract_kind_overrides={k: _as_list(ex.get(k), f"extract.{k}") for k in EXTRACTOR},
            vqa_overrides=_as_list(c.get("vqa_overrides"), "vqa_overrides"),
            settings=settings,
            bench=bench if bench.get("enabled", True) else None,
            expect=c.get("expect") or {},
            recipe=recipe,
            jobs=_jobs(c.get("jobs", 1)),
            evaluate=bool(c.get("evaluate", True)),
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

    def eval_results(self, setting: str, seed: int) -> Path:
        """The val results file of a run's final model, in the official naming; its scores go beside it."""
        return self.run_dir(setting, seed) / "eval" / RESULTS_NAME.format(split=layout.official_split("val"))

    def eval_accuracy(self, setting: str, seed: int) -> Path:
        return accuracy_path(self.eval_results(setting, seed))

    def published(self, setting: str, seed: int) -> Path:
        """Where a VQA run's checkpoint is published (one per seed: finetune reads its seed's)."""
        return self.artifacts_dir / setting / f"seed_{seed}" / "model.ckpt"


def read_steps(results_dir: Path) -> dict[str, dict[str, Any]]:
    """steps.json: per step, the minutes and settings of its last run (empty when absent or corrupt)."""
    try:
        data = json.loads((results_dir / STEPS_FILE).read_text(encoding="utf-8"))
        steps = data["steps"]
        return steps if isinstance(steps, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def rel(p: Path) -> str:
    """`p` relative to the working directory when it is below it (shorter messages)."""
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def say(text: str) -> None:
    print(f"[reproduce] {text}", flush=True)
