"""Compose the real Hydra configs the way `python -m gridvqa.train` does, for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from gridvqa.config import conf_dir, register_resolvers

EXPERIMENTS = sorted(p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml"))


def compose_cfg(
    overrides: list[str],
    data_root: Path | None = None,
    output_dir: Path | None = None,
    config_name: str = "train",
) -> DictConfig:
    """The config an entry point would see, minus the `hydra` node (as in a run)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or (data_root or Path.cwd()) / "run")
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if data_root is not None:
            cfg.paths.data_root = str(data_root)
    return cfg


def compose_choices(
    overrides: list[str], config_name: str = "train", config_dir: Path | None = None
) -> dict[str, str | None]:
    """The config group choices Hydra made for `overrides` (hydra.runtime.choices: group -> option), from
    conf/ or another `config_dir`."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    return dict(cfg.hydra.runtime.choices)
