"""`python -m gridvqa.reproduce`: the plan (what runs, what is skipped and why), the findings' verdicts,
the README block, and the whole pipeline for real on the tiny built-in set (slow)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from gridvqa.config import REPO_ROOT
from gridvqa.data import layout
from gridvqa.data.features import FeatureWriter
from gridvqa.errors import ConfigError
from gridvqa.reporting import Stat
from gridvqa.reproduce import (
    BEGIN,
    END,
    Options,
    StepFailed,
    compare_better,
    compare_close,
    compare_cost,
    execute,
    extraction_gap,
    for_readme,
    kv,
    load_config,
    main,
    multirun_command,
    plan,
    read_block,
    replace_block,
    reproduce,
    signature,
    threads_per_job,
    write_readme,
    write_results,
)
from gridvqa.reproduce.run import _blocks, _dependencies

SETTINGS = ["frozen_random", "frozen", "region", "region_head", "finetune", "finetune_frozen", "e2e"]
EXPERIMENT = {**{s: s for s in SETTINGS}, "region_head": "region", "finetune_frozen": "finetune"}


def options(tmp: Path, *extra: str) -> Options:
    return Options.from_cfg(load_config(where(tmp) + list(extra)))


def where(tmp: Path) -> list[str]:
    """Every path of the config inside `tmp` (never the repository's data/, logs/, artifacts/, results/)."""
    return [
        kv("paths.data_root", tmp / "data"),
        kv("paths.log_dir", tmp / "logs"),
        kv("paths.artifacts_dir", tmp / "artifacts"),
        kv("results_dir", tmp / "results"),
        kv("readme", tmp / "README.md"),
    ]


def fake_data(tmp: Path, images: dict[str, list[int]] | None = None) -> Path:
    """The files of a data root the planner looks at (questions, answers, VG objects) and a README."""
    root = tmp / "data"
    for split, ids in (images or {"train": [1, 2, 3], "val": [7, 8]}).items():
        qs = [{"image_id": i, "question": "what color is it?", "question_id": 10 * i} for i in ids]
        path = layout.questions_path(root, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"questions": qs}))
    (root / "answers.json").write_text(json.dumps({"answers": ["yes", "no"], "min_count": 1}))
    (root / "vg").mkdir()
    (root / "vg" / "objects.json").write_text("[]")
    (root / "stats.json").write_text(json.dumps({"blind_prior": {"overall": {"question_prior": 30.0}}}))
    (tmp / "README.md").write_text(f"# x\n\n### Results\n\nabove\n\n{BEGIN}\nold\n{END}\n\nbelow\n")
    return root


def write_h5(path: Path, kind: str, ids: list[int]) -> None:
    rng = np.random.default_rng(0)
    with FeatureWriter(path, kind, {"test": "fake"}, overwrite=True) as w:
        for i in ids:
            if kind == "grid":
                w.add_grid(i, rng.standard_normal((2, 2, 8)).astype(np.float32), (64, 64))
            else:
                boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32)
                w.add_region(i, rng.standard_normal((2, 8)).astype(np.float32), boxes, (64, 64))


BENCH = {
    "args": {
        "arch": "R-tiny", "size": [192, 192], "images": 8, "batch": 1, "workers": 0, "device": "cpu",
        "proposals": [1000, 100], "precision": "float32", "flops": False, "json": "x",
    },
    "results": {
        "backbone": {"images": 8, "seconds": 0.08, "images_per_s": 100.0},
        "grid": {"images": 8, "seconds": 0.16, "images_per_s": 50.0},
        "region@1000": {"images": 8, "seconds": 16.0, "images_per_s": 0.5, "res5_regions_per_image": 800.0},
        "region@100": {"images": 8, "seconds": 1.6, "images_per_s": 5.0, "res5_regions_per_image": 100.0},
    },
}  # fmt: skip


def fake_done(opts: Options) -> None:
    """What every step would have made, written directly, then the real report and README block."""
    for st in plan(opts):
        if st.kind == "pretrain":
            for out in st.outputs:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("{}")
        elif st.kind == "extract":
            kind, split = st.name.split()[1:]
            questions = json.loads(layout.questions_path(opts.data_root, split).read_text())["questions"]
            write_h5(st.outputs[0], kind, sorted({q["image_id"] for q in questions}))
        elif st.kind == "train":
            acc = {"frozen_random": 36.0, "frozen": 38.0, "region": 39.0, "region_head": 39.5,
                   "finetune": 39.0, "finetune_frozen": 38.5, "e2e": 40.0}
            value = acc[st.setting] + 0.1 * st.seed
            summary = {
                "task_name": st.setting,
                "seed": st.seed,
                "overrides": st.overrides,
                "optimized_metric": {"name": "val/vqa_acc", "value": value},
                "metrics": {"val/vqa_acc": value, "val/vqa_acc_yes_no": 60.0, "val/loss": 1.0},
                "minutes": 2.0,
            }
            st.outputs[0].parent.mkdir(parents=True, exist_ok=True)
            st.outputs[0].write_text(json.dumps(summary))
            for ckpt in st.outputs[1:]:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                ckpt.write_bytes(b"ckpt")
        elif st.kind == "evaluate":
            shift = 2.0 if st.setting == "e2e" else 0.0
            scores = {"overall": 40.0, "perAnswerType": {"other": 40.0},
                      "perQuestionType": {"what color is the": 50.0 + shift + st.seed, "how many": 30.0}}
            st.outputs[0].parent.mkdir(parents=True, exist_ok=True)
            st.outputs[0].write_text(json.dumps(scores))
        elif st.kind == "bench":
            st.outputs[0].parent.mkdir(parents=True, exist_ok=True)
            st.outputs[0].write_text(json.dumps(BENCH))
    write_results(opts)
    write_readme(opts)


def decisions(opts: Options) -> dict[str, str | None]:
    return {st.name: st.reason for st in plan(opts)}


def running(opts: Options) -> list[str]:
    return [name for name, reason in decisions(opts).items() if reason]


# ----------------------------------------------------------------------------------------------
# configuration


def test_default_config():
    opts = Options.from_cfg(load_config([]))
    assert opts.seeds == [1, 2, 3]
    assert [s.name for s in opts.settings] == SETTINGS
    assert opts.setting("finetune").init_from == "frozen"
    control = opts.setting("finetune_frozen")
    assert control.init_from == "frozen" and "model.backbone_trainable=false" in control.overrides
    assert opts.pretrain == ["pretrain_vg", "pretrain_vg_c4"]
    assert opts.extract_kinds == ["grid", "region"] and opts.extract_splits == ["train", "val"]
    # what trains: the experiment files as `make train` runs them
    assert opts.recipe is None and opts.vqa_overrides == [] and opts.jobs == 1
    assert [s.experiment for s in opts.settings] == [EXPERIMENT[s] for s in SETTINGS]
    assert opts.pretrain_experiments == {n: n for n in opts.pretrain}
    # the short recipe: conf/experiment/reproduce/
    short = Options.from_cfg(load_config(["recipe=reproduce"]))
    assert [s.experiment for s in short.settings] == [f"reproduce/{EXPERIMENT[s]}" for s in SETTINGS]
    assert short.pretrain_experiments == {n: f"reproduce/{n}" for n in short.pretrain}
    assert opts.readme == REPO_ROOT / "docs" / "results.md" and opts.results_dir == REPO_ROOT / "results"
    assert opts.runs_dir == REPO_ROOT / "logs" / "reproduce"
    # its pre-training writes beside, not over, `make train`'s artifacts/pretrain_vg
    assert opts.artifacts_dir == REPO_ROOT / "artifacts" / "reproduce"
    assert opts.published("e2e", 1) == REPO_ROOT / "artifacts" / "reproduce" / "e2e" / "seed_1" / "model.ckpt"
    assert opts.bench is not None and opts.bench["proposals"] == [1000, 100]
    # the file the default config rewrites has its block
    assert read_block(opts.readme) is not None


def test_override_lists_as_plain_strings():
    opts = Options.from_cfg(
        load_config(
            ["vqa_overrides=trainer.max_epochs=1 data.image_size=[96,96]", "setting.e2e.overrides=a=1"]
        )
    )
    assert opts.vqa_overrides == ["trainer.max_epochs=1", "data.image_size=[96,96]"]
    assert opts.setting("e2e").overrides == ["a=1"]
    opts = Options.from_cfg(
        load_config(["train_overrides=['x=1','y=[1,2]']", "extract.region=region.proposals=5"])
    )
    assert opts.train_overrides == ["x=1", "y=[1,2]"]
    assert opts.extract_kind_overrides["region"] == ["region.proposals=5"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["settings=[nope]"], "'nope' is not defined"),
        (["settings=[finetune,frozen]"], "must be in `settings` before 'finetune'"),
        (["seeds=[1,1]"], "seeds must differ"),
        (["seeds=[]"], "non-empty list"),
        (["extract.kinds=[pixels]"], "'pixels' is not one of grid, region"),
        (["setting.e2e.experiment=nope"], "no conf/experiment/nope.yaml"),
        (["recipe=reproduce", "pretrain=[nope]"], "no conf/experiment/reproduce/nope.yaml"),
        (["pretrain=[nope]"], "no conf/experiment/nope.yaml"),
        (["jobs=0"], "jobs must be a whole number"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match="^" + ".*" + message.replace("[", r"\[").replace("]", r"\]")):
        Options.from_cfg(load_config(overrides))


def test_main_prints_one_line_errors(capsys, tmp_path):
    assert main(["bogus=1"]) == 1
    assert main(["settings=[nope]"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    # a README without the markers is refused before anything runs
    fake_data(tmp_path)
    (tmp_path / "README.md").write_text("# no block\n")
    assert main([*where(tmp_path), "dry_run=true"]) == 1
    assert "needs exactly one <!-- reproduce:begin -->" in capsys.readouterr().err


def test_kv_values_survive_hydra_parsing():
    parser = OverridesParser.create()
    for value in [
        "/plain/path",
        "/with space/x",
        "/a,b/c",
        "it's",
        "x=y",
        "back\\slash",
        "end\\",
        "a\\'b",
        "[1,2]",
    ]:
        assert parser.parse_override(kv("k", value)).value() == value


# The keys conf/experiment/reproduce/<name>.yaml may change in conf/experiment/<name>.yaml: its size
# (conf/experiment/reproduce/_pretrain.yaml, _vqa.yaml, _grid.yaml), never what the setting is.
VQA_SIZE = {"trainer.max_epochs": 2, "callbacks.val_attention": None}
GRID_SIZE = {
    **VQA_SIZE,
    "backbone.res5_dilation": 1,
    "data.image_size": [192, 192],
    "model.head.ffn": 512,
    "model.head.dropout": 0.1,
}
PRETRAIN_SIZE = {
    "data.train_short": 160,
    "data.test_short": 160,
    "data.max_size": 224,
    "trainer.max_epochs": 4,
    "model.milestones": [700, 850],
    "model.warmup_steps": 100,
    "model.detector.rpn_pre_nms_top_n_train": 12000,
    "model.detector.rpn_post_nms_top_n_train": 2000,
    "model.detector.rpn_pre_nms_top_n_test": 6000,
    "model.detector.rpn_post_nms_top_n_test": 1000,
}
RECIPE = {
    "frozen_random": {**GRID_SIZE, "model.lr": 1.0e-3},
    "frozen": {**GRID_SIZE, "model.lr": 1.0e-3},
    "region": VQA_SIZE,
    "finetune": GRID_SIZE,
    "e2e": {**GRID_SIZE, "model.lr": 1.0e-3},
    "pretrain_vg": PRETRAIN_SIZE,
    "pretrain_vg_c4": PRETRAIN_SIZE,
}


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _train_cfg(experiment: str) -> dict:
    from omegaconf import OmegaConf

    from gridvqa.config import compose_config

    cfg = compose_config("train", [f"experiment={experiment}"])
    return _flat(OmegaConf.to_container(cfg, resolve=False))


@pytest.mark.parametrize("name", list(RECIPE))
def test_recipe_files_are_the_experiments_at_reproduce_size(name):
    base, pinned = _train_cfg(name), _train_cfg(f"reproduce/{name}")
    changed = {k for k in base.keys() | pinned.keys() if base.get(k) != pinned.get(k)}
    # a key set to null drops the whole subtree under it (callbacks.val_attention.*)
    beyond = {k for k in changed if not any(k == a or k.startswith(a + ".") for a in RECIPE[name])}
    assert not beyond
    assert {k: pinned[k] for k in RECIPE[name]} == RECIPE[name]
    assert pinned["task_name"] == name  # run folders, exported weights and reports keep the name


# ----------------------------------------------------------------------------------------------
# planning and skipping


def test_fresh_plan_runs_everything_in_order(tmp_path, capsys):
    fake_data(tmp_path)
    opts = options(tmp_path, "recipe=reproduce")
    steps = plan(opts)
    names = [st.name for st in steps]
    assert names[:7] == [
        "data",
        "pretrain pretrain_vg",
        "pretrain pretrain_vg_c4",
        "extract grid train",
        "extract grid val",
        "extract region train",
        "extract region val",
    ]
    trains = [(st.setting, st.seed) for st in steps if st.kind == "train"]
    assert trains == [(s, seed) for s in SETTINGS for seed in (1, 2, 3)]
    # then the official scorer on each run's final model
    evals = [st for st in steps if st.kind == "evaluate"]
    assert [(st.setting, st.seed) for st in evals] == trains
    assert names[-3:] == ["bench", "report", "readme"] and names[-4] == "evaluate e2e seed 3"
    assert steps[0].reason is None and "answers.json exists" in steps[0].note
    assert all(st.runs for st in steps[1:])

    by_name = {st.name: st for st in steps}
    fine = by_name["train finetune seed 2"]
    assert "model.init_from=${paths.artifacts_dir}/frozen/seed_${seed}/model.ckpt" in fine.overrides
    assert opts.published("frozen", 2) in fine.inputs
    assert opts.published("frozen", 2) in by_name["train frozen seed 2"].outputs
    assert not any(o.startswith("model.init_from") for o in by_name["train e2e seed 2"].overrides)
    # one multirun per setting over its seeds, each seed in its own folder
    cmd = multirun_command(opts, [by_name[f"train frozen seed {s}"] for s in (1, 2, 3)])
    assert cmd[1:5] == ["-m", "gridvqa.train", "-m", "experiment=reproduce/frozen"]
    assert "seed=1,2,3" in cmd and "hydra.sweep.subdir=seed_${seed}" in cmd
    assert f"hydra.sweep.dir={opts.runs_dir / 'frozen'}" in cmd and "ckpt_path=last" in cmd
    assert by_name["pretrain pretrain_vg"].commands[0][3] == "experiment=reproduce/pretrain_vg"
    assert by_name["bench"].commands[0][1:3] == ["-m", "gridvqa.benchmarks.extraction"]
    ev = by_name["evaluate region seed 2"]
    run = opts.run_dir("region", 2)
    assert ev.inputs == [run / "metrics.json"] and ev.reason == "not evaluated yet"
    assert ev.outputs == [run / "eval" / "vqa_OpenEnded_mscoco_val2014_gridvqa_accuracy.json"]
    assert ev.commands[0][1:5] == ["-m", "gridvqa.evaluate", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                                   "split=val"]
    assert f"out={run / 'eval' / 'vqa_OpenEnded_mscoco_val2014_gridvqa_results.json'}" in ev.commands[0]
    assert "evaluate region seed 2" not in [st.name for st in plan(options(tmp_path, "evaluate=false"))]
    # recipe=null (the default): the experiment files as they are
    plain = {st.name: st for st in plan(options(tmp_path))}
    assert plain["train frozen seed 1"].overrides[0] == "experiment=frozen"
    assert plain["train frozen seed 1"].signature != by_name["train frozen seed 1"].signature
    # a dry run says so and runs nothing
    assert reproduce([*where(tmp_path), "dry_run=true"]) == []
    out = capsys.readouterr().out
    assert "would run: train finetune seed 3 (not run yet)" in out and "skip: data" in out
    assert not (tmp_path / "logs").exists() and not (tmp_path / "results").exists()


def test_everything_made_is_skipped_and_changes_redo_what_depends_on_them(tmp_path):
    fake_data(tmp_path)
    opts = options(tmp_path)
    fake_done(opts)
    assert running(opts) == []
    results = (tmp_path / "results" / "results.md").read_text()
    assert (
        "| `e2e` > `frozen` | 40.20 ± 0.10 vs 38.20 ± 0.10 (+2.00) | yes, beyond the seeds' spread" in results
    )
    # accuracy per question type: a row per type, a column per setting, over the seeds
    assert "| question type | " + " | ".join(f"`{s}`" for s in SETTINGS) + " |" in results
    assert "| what color is the | " + "52.00 ± 1.00 | " * 6 + "54.00 ± 1.00 |" in results
    assert "| how many | 30.00 ± 0.00 |" in results
    assert read_block(tmp_path / "README.md").strip().startswith("`python -m gridvqa.reproduce`")

    # new pre-trained grid weights: grid features and every run on that backbone, finetune through frozen
    backbone = opts.artifacts_dir / "pretrain_vg" / "backbone.safetensors"
    os.utime(opts.artifacts_dir / "pretrain_vg" / "config.json")
    os.utime(backbone)
    reasons = decisions(opts)
    assert [n for n, r in reasons.items() if r] == [
        "extract grid train",
        "extract grid val",
        *[f"{kind} {s} seed {seed}" for s in ("frozen", "finetune", "finetune_frozen", "e2e")
          for kind in ("train", "evaluate")
          for seed in (1, 2, 3)],
        "report",
        "readme",
    ]
    assert reasons["evaluate e2e seed 1"].endswith("e2e/seed_1/metrics.json is remade")
    assert reasons["train e2e seed 1"].endswith("pretrain_vg/backbone.safetensors is newer")
    assert reasons["train finetune seed 1"].endswith("frozen/seed_1/model.ckpt is remade")
    steps = {st.name: st for st in plan(opts)}
    assert steps["extract grid val"].commands[0][-1] == "overwrite=true"  # other weights: not mixed
    assert steps["train e2e seed 1"].move_aside == opts.run_dir("e2e", 1)


def test_changed_settings_and_missing_checkpoints(tmp_path):
    fake_data(tmp_path)
    opts = options(tmp_path, "bench.enabled=false")
    fake_done(opts)
    assert running(opts) == []
    # other VQA settings: every run again, its old folder moved aside; pre-training and features kept
    changed = options(tmp_path, "bench.enabled=false", "vqa_overrides=model.weight_decay=0.5")
    reasons = decisions(changed)
    trains = {n: r for n, r in reasons.items() if n.startswith("train")}
    assert set(trains.values()) == {"made with other settings"}
    assert not any(reasons[n] for n in reasons if n.startswith(("pretrain", "extract", "data")))
    # fewer seeds or settings: nothing to run but the report
    assert running(options(tmp_path, "bench.enabled=false", "seeds=[1,2]")) == ["report", "readme"]
    # only plumbing differs (other folders): nothing to run
    assert running(opts) == []
    # frozen's seed-2 checkpoint gone: frozen 2 again, then finetune 2, which starts from it
    opts.published("frozen", 2).unlink()
    reasons = decisions(opts)
    assert [n for n, r in reasons.items() if r] == [
        "train frozen seed 2",
        "evaluate frozen seed 2",
        "train finetune seed 2",
        "evaluate finetune seed 2",
        "train finetune_frozen seed 2",
        "evaluate finetune_frozen seed 2",
        "report",
        "readme",
    ]
    assert reasons["train frozen seed 2"].endswith("frozen/seed_2/model.ckpt is missing")


def test_interrupted_steps_resume(tmp_path):
    fake_data(tmp_path)
    opts = options(tmp_path, "bench.enabled=false", "settings=[frozen_random]", "seeds=[1,2]")
    steps = {st.name: st for st in plan(opts)}
    # a training run killed before it finished: same settings resume from last.ckpt, others move aside
    for seed, overrides in ((1, steps["train frozen_random seed 1"].overrides), (2, ["experiment=e2e"])):
        hydra_dir = opts.run_dir("frozen_random", seed) / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    steps = {st.name: st for st in plan(opts)}
    assert steps["train frozen_random seed 1"].reason == "resumes the interrupted run"
    assert steps["train frozen_random seed 1"].move_aside is None
    assert steps["train frozen_random seed 2"].reason == "made with other settings"
    assert steps["train frozen_random seed 2"].move_aside == opts.run_dir("frozen_random", 2)
    # a pre-training killed mid-way resumes in its run folder
    pre = opts.runs_dir / "pretrain_vg" / ".hydra"
    pre.mkdir(parents=True)
    cmd = steps["pretrain pretrain_vg"].commands[0]
    (pre / "overrides.yaml").write_text(yaml.safe_dump([a for a in cmd[3:] if not a.startswith("hydra.")]))
    assert plan(opts)[1].reason == "no exported weights yet; resumes the interrupted run"


def test_extraction_gap(tmp_path):
    root = fake_data(tmp_path, {"train": [1, 2, 3], "val": [7, 8]})
    out = root / "features" / "grid_val.h5"
    assert extraction_gap(out, root, "val") == "not extracted yet"
    write_h5(out, "grid", [7])
    assert extraction_gap(out, root, "val") == "1 images of val missing (resumes)"
    # an image the extractor listed as unreadable does not make the file incomplete
    skipped = out.with_name(out.name + ".skipped.json")
    skipped.write_text(json.dumps({"skipped": [{"image_id": 8, "path": "x.jpg", "reason": "truncated"}]}))
    assert extraction_gap(out, root, "val") is None
    skipped.unlink()
    write_h5(out, "grid", [7, 8])
    assert extraction_gap(out, root, "val") is None
    out.with_name(out.name + ".parts").mkdir()  # a writer's leftovers: it was killed
    assert extraction_gap(out, root, "val") == "interrupted (resumes)"


def test_a_failing_step_stops_with_one_line(tmp_path):
    """The real synthetic-data command, given an argument it does not know."""
    (tmp_path / "README.md").write_text(f"{BEGIN}\n{END}\n")
    opts = options(tmp_path, "data.synthetic_args=[--no-such-flag]", "bench.enabled=false")
    steps = plan(opts)
    assert steps[0].reason == "no data yet"
    with pytest.raises(
        StepFailed, match=r"^data: `.*gridvqa.data.synthetic .* --no-such-flag` exited with status 2$"
    ):
        execute(opts, steps)
    assert not (tmp_path / "results").exists()


def test_jobs_run_training_side_by_side_in_dependency_order(tmp_path):
    fake_data(tmp_path)
    steps = plan(options(tmp_path, "jobs=3"))
    blocks = [(together, [st.kind for st in block]) for together, block in _blocks(steps, 3)]
    assert blocks == [
        (False, ["data"]),
        (True, ["pretrain"] * 2),
        (False, ["extract"] * 4),
        (True, (["train"] * 3 + ["evaluate"] * 3) * 7),  # a setting's evaluations after its runs
        (False, ["bench", "report", "readme"]),
    ]
    deps = _dependencies(_blocks(steps, 3)[3][1])
    # finetune starts from its seed's frozen model, a run's evaluation waits for it; the rest is independent
    assert {name: d for name, d in deps.items() if d} == {
        **{f"train {n} seed {s}": {f"train frozen seed {s}"} for n in ("finetune", "finetune_frozen")
           for s in (1, 2, 3)},
        **{f"evaluate {n} seed {s}": {f"train {n} seed {s}"} for n in SETTINGS for s in (1, 2, 3)},
    }
    # one job: everything in plan order, a setting's seeds in one multirun as before
    assert [(together, len(block)) for together, block in _blocks(steps, 1)] == [(False, len(steps))]


def test_a_failing_run_side_by_side_stops_with_one_line(tmp_path):
    """Two real training commands at once, both refused by Hydra: nothing recorded, the log named."""
    fake_data(tmp_path)
    opts = options(
        tmp_path, "jobs=2", "settings=[frozen_random]", "seeds=[1,2]", "pretrain=[]", "extract.kinds=[]",
        "bench.enabled=false", "train_overrides=trainer.no_such_key=1",
    )  # fmt: skip
    steps = plan(opts)
    with pytest.raises(StepFailed) as e:
        execute(opts, steps)
    message = str(e.value)
    assert "\n" not in message and " exited with status 1 (its output: " in message
    seed = 1 if message.startswith("train frozen_random seed 1: ") else 2
    log = opts.run_dir("frozen_random", seed).with_name(f"seed_{seed}.log")
    assert message.endswith(f"{log})") and "no_such_key" in log.read_text()
    assert not (opts.results_dir / "steps.json").exists()


def test_threads_per_job():
    assert threads_per_job(2, {"OMP_NUM_THREADS": "8"}) == 4
    assert threads_per_job(3, {"OMP_NUM_THREADS": "8"}) == 2
    assert threads_per_job(4, {"OMP_NUM_THREADS": "2"}) == 1
    assert threads_per_job(1, {"OMP_NUM_THREADS": "x"}) >= 1  # unreadable: the usable cores


# ----------------------------------------------------------------------------------------------
# findings


def test_compare_better():
    v = compare_better("e2e", Stat(40.0, 0.2, 3), "frozen", Stat(38.0, 0.3, 3))
    assert v.holds and v.answer.startswith("yes, beyond the seeds' spread")
    assert v.measured == "40.00 ± 0.20 vs 38.00 ± 0.30 (+2.00)"
    v = compare_better("e2e", Stat(38.2, 1.0, 3), "frozen", Stat(38.0, 1.0, 3))
    assert v.holds and "but within the seeds' spread" in v.answer
    v = compare_better("frozen", Stat(36.0, 0.1, 3), "frozen_random", Stat(37.0, 0.1, 3))
    assert v.holds is False and v.answer.startswith("no, beyond")
    v = compare_better("a", Stat(2.0, None, 1), "b", Stat(1.0, None, 1))
    assert v.holds and "one seed" in v.answer
    assert compare_better("a", None, "b", Stat(1.0, None, 1)).answer == "not measured"


def test_compare_close_and_cost():
    assert compare_close("frozen", Stat(38.5, 0.1, 3), "region", Stat(40.0, 0.1, 3), 2.0).holds
    assert not compare_close("frozen", Stat(37.5, 0.1, 3), "region", Stat(40.0, 0.1, 3), 2.0).holds
    better = compare_close("frozen", Stat(41.0, 0.1, 3), "region", Stat(40.0, 0.1, 3), 2.0)
    assert better.holds and "grid is better" in better.answer
    cost = compare_cost(BENCH, 2.0)
    assert cost.holds and cost.measured == "region@1000: 100.0x, region@100: 10.0x"
    assert compare_cost(BENCH, 20.0).holds is False  # region@100 is only 10x the grid's time
    assert compare_cost(None, 2.0).holds is None


# ----------------------------------------------------------------------------------------------
# README block


def test_readme_block(tmp_path):
    results = (
        "# Title\n\nintro [r](report.md) ![p](report.png) [w](https://x.org/a)\n\n"
        "## Part\n\n```\n# kept\n```\n"
    )
    block = for_readme(results, "results/", level=4)
    assert block.splitlines()[0].startswith("intro [r](results/report.md) ![p](results/report.png)")
    assert "[w](https://x.org/a)" in block and "#### Part" in block and "\n# kept\n" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{BEGIN}\nold\n{END}\nb\n")
    assert replace_block(readme.read_text(), "new\n", readme) == f"a\n{BEGIN}\nnew\n{END}\nb\n"
    for bad in ("no markers", f"{END}\n{BEGIN}", f"{BEGIN}{BEGIN}{END}"):
        readme.write_text(bad)
        with pytest.raises(ConfigError, match=f"^{readme}: "):
            read_block(readme)


# ----------------------------------------------------------------------------------------------
# the whole pipeline, for real

# Tiny sizes: one train and one validation batch per run (debug=fdr), small images and detectors
PRETRAIN = (
    "data.train_short=96 data.test_short=96 data.max_size=128 model.detector.fc_dim=64 "
    "model.detector.anchor_sizes=[16,32,64] model.detector.batch_size_per_image=32"
)
TINY = [
    "seeds=[1,2]",
    "train_overrides=debug=fdr data.batch_size=2 trainer.enable_progress_bar=false",
    f"pretrain_overrides.pretrain_vg={PRETRAIN}",
    f"pretrain_overrides.pretrain_vg_c4={PRETRAIN}",
    "extract.overrides=image_size=[96,96] num_workers=0 batch_size=2 progress=false",
    "vqa_overrides=data.image_size=[96,96] data.val_batch_size=2 callbacks.val_attention=null",
    "bench.size=[64,96]",
    "bench.images=2",
    "bench.proposals=[100,20]",
]


@pytest.mark.slow
def test_reproduce_end_to_end(tiny_shapes, tmp_path, capfd, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)  # features are written next to the data: not into the shared fixture
    readme = tmp_path / "README.md"
    shutil.copyfile(REPO_ROOT / "docs" / "results.md", readme)
    args = [*where(tmp_path), *TINY]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the steps share two cores with other work
    ran = reproduce(args)
    opts = options(tmp_path, *TINY)
    everything = [st.name for st in plan(opts)]
    assert ran == everything[1:]  # all but the data, which the fixture made

    for name in ("report.md", "report.csv", "report.png", "extraction.png", "extraction.md", "results.md"):
        assert (tmp_path / "results" / name).stat().st_size > 0, name
    results = (tmp_path / "results" / "results.md").read_text()
    for s in SETTINGS:
        assert f"| `{s}` |" in results
    assert "| `e2e` > `frozen` |" in results and "| `frozen` > `frozen_random` |" in results
    assert "| `finetune` > `finetune_frozen` |" in results
    assert "of 5 hold in this run" in results
    assert "## Accuracy per question type" in results and "| what color is the |" in results
    steps = json.loads((tmp_path / "results" / "steps.json").read_text())["steps"]
    assert set(steps) == set(everything[1:-2])
    # each run in its own folder; finetune started from the frozen model of its own seed
    for s in SETTINGS:
        for seed in (1, 2):
            summary = json.loads((opts.run_dir(s, seed) / "metrics.json").read_text())
            assert summary["seed"] == seed and summary["task_name"] == s
            assert opts.published(s, seed).is_file()
    hydra_cfg = yaml.safe_load((opts.run_dir("finetune", 2) / ".hydra" / "config.yaml").read_text())
    assert hydra_cfg["model"]["init_from"] == "${paths.artifacts_dir}/frozen/seed_${seed}/model.ckpt"
    # the control trained the head only: its backbone is still the frozen model's, finetune's is not
    def backbone(setting: str) -> dict:
        sd = torch.load(opts.published(setting, 2), map_location="cpu", weights_only=True)["state_dict"]
        return {k: v for k, v in sd.items() if k.startswith("backbone.")}

    start, control, tuned = backbone("frozen"), backbone("finetune_frozen"), backbone("finetune")
    assert start and all(torch.equal(start[k], control[k]) for k in start)
    assert not all(torch.equal(start[k], tuned[k]) for k in start)
    for kind in ("grid", "region"):
        for split in ("train", "val"):
            assert extraction_gap(data / "features" / f"{kind}_{split}.h5", data, split) is None

    # the copy of docs/results.md: its block is results.md, the rest unchanged
    text, original = readme.read_text(), (REPO_ROOT / "docs" / "results.md").read_text()
    block = read_block(readme)
    assert "\n### The paper's findings in this run" in block and "](results/report.png)" in block
    assert text.split(BEGIN)[0] == original.split(BEGIN)[0]
    assert text.split(END)[1] == original.split(END)[1]

    # run again: every step is skipped, nothing is started
    capfd.readouterr()
    assert reproduce(args) == []
    out = capfd.readouterr().out
    assert out.count("skip: ") == len(everything) and "$ " not in out


@pytest.mark.slow
def test_jobs_two_runs_at_once_give_the_sequential_records(tiny_shapes, tmp_path, capfd, monkeypatch):
    """Two seeds of frozen_random at once (jobs=2), then one after the other: the same figures."""
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    common = [
        kv("paths.data_root", data),
        kv("paths.log_dir", tmp_path / "logs"),
        "readme=null",
        "pretrain=[]",
        "extract.kinds=[]",
        "bench.enabled=false",
        "settings=[frozen_random]",
        "seeds=[1,2]",
        "evaluate=false",
        "train_overrides=debug=fdr data.batch_size=2 trainer.enable_progress_bar=false",
        "vqa_overrides=data.image_size=[64,64] data.val_batch_size=2",
    ]
    # one thread each either way (jobs=2 divides OMP_NUM_THREADS): the same arithmetic, so equal figures
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    records = {}
    for jobs in (2, 1):
        where_ = [kv("results_dir", tmp_path / f"results_{jobs}"), kv("runs_dir", tmp_path / f"runs_{jobs}"),
                  kv("paths.artifacts_dir", tmp_path / f"artifacts_{jobs}")]  # fmt: skip
        ran = reproduce([*common, *where_, f"jobs={jobs}"])
        assert ran == ["train frozen_random seed 1", "train frozen_random seed 2", "report"]
        lines = capfd.readouterr().out.splitlines()
        opts = options(tmp_path, *common, *where_)
        records[jobs] = {
            seed: json.loads((opts.run_dir("frozen_random", seed) / "metrics.json").read_text())
            for seed in (1, 2)
        }
        if jobs == 2:
            started = [i for i, line in enumerate(lines) if line.startswith("[reproduce] $ ")]
            finished = [i for i, line in enumerate(lines) if line.startswith("[reproduce] done: train")]
            assert len(started) == 2 and len(finished) == 2
            assert max(started) < min(finished)  # the second started before the first had finished
            for seed in (1, 2):
                log = opts.run_dir("frozen_random", seed).with_name(f"seed_{seed}.log")
                assert log.stat().st_size > 0
    for seed in (1, 2):
        par, seq = records[2][seed], records[1][seed]
        assert par["seed"] == seq["seed"] == seed
        assert par["metrics"] and par["metrics"] == seq["metrics"]
        assert signature(par["overrides"]) == signature(seq["overrides"])
