"""Every experiment file composes and resolves; the entry point finds conf/ from any directory."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from gridvqa.config import conf_dir, register_resolvers

EXPERIMENTS = sorted(p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml"))


def compose_cfg(overrides: list[str], data_root: Path | None = None, output_dir: Path | None = None):
    """The config `python -m gridvqa.train` would see, minus the `hydra` node (as in a run)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or (data_root or Path.cwd()) / "run")
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if data_root is not None:
            cfg.paths.data_root = str(data_root)
    return cfg


@pytest.fixture
def vocab_root(tmp_path):
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / "objects_vocab.txt").write_text("circle\nsquare\ntriangle\n")
    (tmp_path / "vg" / "attributes_vocab.txt").write_text("red\nblue\n")
    (tmp_path / "answers.json").write_text('{"answers": ["yes", "no", "2"]}')
    return tmp_path


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_resolves(name, vocab_root):
    cfg = compose_cfg([f"experiment={name}"], vocab_root)
    OmegaConf.resolve(cfg)
    assert cfg.task_name and cfg.optimized_metric
    assert "_target_" in cfg.model and "_target_" in cfg.data and "_target_" in cfg.trainer


def test_vocab_sizes_come_from_data(vocab_root):
    cfg = compose_cfg(["experiment=pretrain_vg"], vocab_root)
    assert cfg.model.num_classes == 3 and cfg.model.num_attributes == 2
