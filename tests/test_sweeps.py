"""Hydra sweeps: one folder per sweep, metrics.json per run, the Optuna sweeper and the SLURM launcher.

The multirun tests run the real entry point (`python -m gridvqa.train -m ...`) in a subprocess with
one train and one validation batch per job (debug=tiny) on the tiny built-in set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from gridvqa.config import compose_config
from gridvqa.reporting import collect_runs, write_report
from hydra_utils import compose_cfg
from test_experiments import run_experiment, write_pretrained_backbone

# the smallest sizes, one train and one validation batch (conf/debug/tiny.yaml)
TINY = ["debug=tiny"]


def train_cli(args: list[str], root: Path, tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "gridvqa.train",
        *args,
        *TINY,
        f"paths.data_root={root}",
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.artifacts_dir={tmp / 'artifacts'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The whole config as a Hydra launcher or sweeper sees it (hydra node kept, unlike compose_cfg):
    their settings interpolate both `hydra.*` and the job's keys."""
    compose_cfg([])  # sets the HydraConfig that `${hydra:...}` interpolations read
    return compose_config("train", overrides, return_hydra_config=True)


def sweep_dirs(tmp: Path) -> list[Path]:
    return sorted((tmp / "logs" / "multiruns").iterdir())


# ----------------------------------------------------------------------------------------------
# one folder per sweep


def test_sweep_dir_is_shared_by_every_experiment(tmp_path):
    """Each job re-resolves hydra.sweep.dir with its own config: it must not name the task, or
    `experiment=a,b` scatters one sweep over logs/a/ and logs/b/."""
    parents = set()
    for name in ("frozen", "e2e", "region", "pretrain_vg"):
        cfg = compose_cfg([f"experiment={name}", f"paths.log_dir={tmp_path}"], tmp_path)
        hc = hydra.core.hydra_config.HydraConfig.get()
        parents.add(Path(hc.sweep.dir).parent)
        assert cfg.task_name == name
    assert parents == {tmp_path / "multiruns"}


@pytest.fixture(scope="module")
def multirun(tiny_shapes, tmp_path_factory) -> Path:
    """`-m experiment=frozen,e2e seed=1,2`, for real: 4 jobs in one process, one after another."""
    tmp = tmp_path_factory.mktemp("multirun")
    write_pretrained_backbone(tmp / "artifacts")
    train_cli(["-m", "experiment=frozen,e2e", "seed=1,2"], tiny_shapes, tmp)
    (sweep,) = sweep_dirs(tmp)
    return sweep


@pytest.mark.slow
def test_multirun_every_combination_in_its_own_folder(multirun):
    jobs = sorted(p for p in multirun.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        summary = json.loads((job / "metrics.json").read_text())
        overrides = summary["overrides"]
        exp = next(o.split("=")[1] for o in overrides if o.startswith("experiment="))
        seen.add((exp, summary["seed"]))
        assert summary["task_name"] == exp == summary["experiment"]
        assert summary["job_num"] == int(job.name)
        assert f"seed={summary['seed']}" in overrides
        assert summary["optimized_metric"]["name"] == "val/vqa_acc"
        assert summary["optimized_metric"]["value"] == summary["metrics"]["val/vqa_acc"]
        assert {"val/vqa_acc", "val/loss", "train/loss"} <= set(summary["metrics"])
        assert 0 < summary["minutes"] < 10
        assert (job / f"{exp}.log").is_file()  # hydra's job log lands in the job folder too
    assert seen == {("frozen", 1), ("frozen", 2), ("e2e", 1), ("e2e", 2)}
    assert (multirun / "multirun.yaml").is_file()


@pytest.mark.slow
def test_report_on_a_real_multirun(multirun, tmp_path):
    report, written = write_report(multirun, tmp_path)
    assert [(r.label, len(r.runs), r.seeds) for r in report.rows] == [
        ("experiment=frozen", 2, [1, 2]),
        ("experiment=e2e", 2, [1, 2]),
    ]
    assert "debug=tiny" in report.common
    assert set(written) == {"md", "csv", "png"}


def test_run_writes_metrics_json(tiny_shapes, tmp_path):
    """The quick version of the multirun check: one run (in process) leaves its summary."""
    value = run_experiment("frozen_random", tiny_shapes, tmp_path / "artifacts", tmp_path)
    (run,), problems = collect_runs(tmp_path)
    assert problems == [] and run.path == tmp_path / "metrics.json"
    assert run.task_name == "frozen_random" and run.seed == 42
    assert run.overrides[:2] == ["experiment=frozen_random", "debug=tiny"]
    assert run.optimized_metric == "val/vqa_acc" and run.metrics["val/vqa_acc"] == value
    assert {"val/loss", "val/vqa_acc_yes_no", "train/loss"} <= set(run.metrics)
    assert 0 < run.minutes < 5


# ----------------------------------------------------------------------------------------------
# Optuna


def test_optuna_search_space_composes():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    cfg = compose_cfg(["experiment=e2e", "hparams_search=optuna"])
    hc = hydra.core.hydra_config.HydraConfig.get()
    sweeper = hc.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert str(hc.mode) == "RunMode.MULTIRUN"  # `-m` is implied
    assert sweeper.direction == "maximize" and sweeper.n_jobs == 1
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 1234
    assert cfg.optimized_metric == "val/vqa_acc"

    parser = OverridesParser.create()
    dists = {
        key: create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))
        for key, value in sweeper.params.items()
    }
    assert isinstance(dists["model.lr"], LogUniformDistribution)
    assert (dists["model.lr"].low, dists["model.lr"].high) == (1e-4, 3e-3)
    assert isinstance(dists["model.backbone_lr_mult"], LogUniformDistribution)
    assert isinstance(dists["data.batch_size"], CategoricalDistribution)
    assert dists["data.batch_size"].choices == (4, 8, 16)
    for key in sweeper.params:  # every searched key exists in the config it overrides
        assert OmegaConf.select(cfg, key) is not None, key
    # the sweeper builds from this config (nothing runs until sweep())
    assert type(hydra.utils.instantiate(sweeper)).__name__ == "OptunaSweeper"


@pytest.mark.slow
def test_optuna_two_trials(tiny_shapes, tmp_path):
    train_cli(
        ["hparams_search=optuna", "experiment=frozen_random", "hydra.sweeper.n_trials=2"],
        tiny_shapes,
        tmp_path,
    )
    (sweep,) = sweep_dirs(tmp_path)
    runs, _ = collect_runs(sweep)
    assert len(runs) == 2
    for run in runs:
        keys = {o.split("=")[0] for o in run.overrides}
        assert {"model.lr", "model.backbone_lr_mult", "data.batch_size"} <= keys
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and "model.lr" in best["best_params"]
    assert best["best_value"] == max(r.metrics["val/vqa_acc"] for r in runs)


# ----------------------------------------------------------------------------------------------
# SLURM (composed and turned into an sbatch script; nothing is submitted)


def test_slurm_launcher_config(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_with_hydra(
        [
            "experiment=e2e",
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            f"paths.log_dir={tmp_path}",
        ]
    )
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    # by name: Hydra's plugin scan may load the module a second time, with its own class objects
    assert type(launcher).__qualname__ == "SlurmLauncher"
    assert type(launcher).__module__ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher"
    p = launcher.params
    # the job's GPUs and processes follow the trainer: one SLURM task per GPU for Lightning DDP
    assert (p["gpus_per_node"], p["tasks_per_node"], p["nodes"]) == (4, 4, 2)
    assert p["partition"] == "gpu" and p["timeout_min"] == 720 and p["name"] == "gridvqa_e2e"
    assert p["submitit_folder"].startswith(str(tmp_path / "multiruns"))

    # submitit's executor accepts every parameter and renders the sbatch script, as the launcher's
    # launch() would before submitting. It insists on finding `srun`: give it one that never runs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=str(tmp_path / "submitit"), slurm_max_num_timeout=0
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            k if k in base else f"slurm_{k}": v
            for k, v in p.items()
            if k not in {"submitit_folder", "max_num_timeout"}
        }
    )
    script = executor._executor._make_submission_file_text("python -m gridvqa.train", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --nodes=2",
        "#SBATCH --time=720",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --job-name=gridvqa_e2e",
    ):
        assert line in script, line


def test_slurm_launcher_needs_a_gpu_count():
    """trainer=ddp's `devices: auto` cannot become an sbatch request: the error names the field."""
    cfg = compose_with_hydra(["experiment=e2e", "hydra/launcher=slurm", "trainer=ddp"])
    with pytest.raises(Exception, match=r"'auto'(.|\n)*hydra\.launcher\.gpus_per_node"):
        hydra.utils.instantiate(cfg.hydra.launcher)
