"""The experiment files are a setting's meaning at a size: conf/experiment/NAME.yaml holds what the setting
means and picks a size from conf/size/ (`override /size: ...`). A paper experiment composes with no CPU size
file in it and a CPU experiment with no paper one, so neither has a value of the other to undo; no layer
sets a key another layer of the same experiment set, or sets one to null, but for the few that say what
the setting is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from gridvqa.config import conf_dir
from hydra_utils import EXPERIMENTS, compose_choices

CONF = Path(conf_dir())
IDENTITY = {"task_name", "tags"}  # every experiment names itself: not a setting
# (file, key) -> why that file sets a key a layer below it sets too: a setting defined by that difference
REFINES = {
    ("frozen", "model.backbone_trainable"): "frozen is e2e's setting with the backbone not trained",
    ("frozen_random", "backbone.weights"): "the control: frozen with random instead of VG weights",
    ("finetune", "model.lr"): "fine-tuning starts from a trained head: a lower rate at CPU size",
}
# key -> what null means where a layer sets it: a choice, not an inherited value taken back
NULL_MEANS = {
    "backbone.weights": "random initialisation",
    "model.backbone": "no backbone: pre-extracted features are the input",
    "data.image_size": "no fixed size: shorter side data.short, longer at most data.max_size",
    "trainer.check_val_every_n_epoch": "validation every trainer.val_check_interval steps",
}


def body(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """A config file's defaults list and its other keys, flattened to dotted keys (lists are values)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    defaults = data.pop("defaults", [])
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(data, "")
    return defaults, flat


def chain(group: str, name: str, conf: Path = CONF) -> list[str]:
    """`group/name` and the files of the same group it includes, those first (the order Hydra merges)."""
    defaults, _ = body(conf / group / f"{name}.yaml")
    files: list[str] = []
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            included = entry.removeprefix(f"/{group}/")
            files += chain(group, included, conf)
    return [*files, f"{group}/{name}"]


def layers(experiment: str, conf: Path = CONF) -> list[str]:
    """The experiment's layer files in merge order: its size's, then its experiment files'."""
    size = compose_choices([f"experiment={experiment}"], config_dir=conf)["size"]
    assert size, f"experiment={experiment} picks no size (override /size: ... in its defaults)"
    return [*chain("size", size, conf), *chain("experiment", experiment, conf)]


def taken_back(experiment: str, conf: Path = CONF) -> list[str]:
    """Keys two layers of `experiment` set to different values, where REFINES does not say why."""
    setters: dict[str, list[tuple[str, Any]]] = {}
    for f in layers(experiment, conf):
        for key, value in body(conf / f"{f}.yaml")[1].items():
            if key not in IDENTITY:
                setters.setdefault(key, []).append((f, value))
    return [f"{key} set by {found}" for key, found in setters.items()
            if len({repr(v) for _, v in found}) > 1 and (Path(found[-1][0]).name, key) not in REFINES]


def bad_nulls(path: Path) -> list[str]:
    return [k for k, v in body(path)[1].items() if v is None and k not in NULL_MEANS]


TOP = [n for n in EXPERIMENTS if "/" not in n]


def mixed_sizes(experiment: str, conf: Path = CONF) -> list[str]:
    """The size files of `experiment` of the other scale: CPU ones (`*cpu`) in a paper experiment,
    others in a CPU one."""
    sizes = [f for f in layers(experiment, conf) if f.startswith("size/")]
    paper = "paper" in experiment
    return [f for f in sizes if f.endswith("cpu") == paper]


@pytest.mark.parametrize("name", TOP)
def test_paper_and_cpu_sizes_do_not_mix(name):
    assert mixed_sizes(name) == []


@pytest.mark.parametrize("name", TOP)
def test_no_layer_takes_back_another(name):
    """A key set by two layers of one experiment is a setting defined by that difference (REFINES) or
    a mistake: a value inherited only to be replaced."""
    assert taken_back(name) == []


def test_null_only_where_it_means_something():
    files = sorted((CONF / "experiment").glob("*.yaml")) + sorted((CONF / "size").glob("*.yaml"))
    assert len(files) > len(TOP)
    for path in files:
        assert bad_nulls(path) == [], f"{path.relative_to(CONF)} sets them to null"


def test_the_checks_catch_a_paper_file_built_on_a_cpu_one(tmp_path):
    """A paper experiment written the other way, on the CPU experiment and its size, undoing the CPU head
    and clipping: each check above fails on it."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "paper_undo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - e2e\n\ntask_name: paper_undo\n"
        "model:\n  head:\n    size: small\n    ffn: null\n    dropout: null\n"
        "trainer:\n  gradient_clip_val: null\n", encoding="utf-8")
    undone = ["model.head.ffn", "model.head.dropout", "trainer.gradient_clip_val"]
    assert mixed_sizes("paper_undo", conf) == ["size/vqa_cpu"]
    assert [u.split(" ")[0] for u in taken_back("paper_undo", conf)] == undone
    assert bad_nulls(conf / "experiment" / "paper_undo.yaml") == undone
