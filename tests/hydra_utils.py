"""Compose the real Hydra configs the way `python -m gridvqa.train` does, for tests."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from gridvqa.config import compose_config, conf_dir

EXPERIMENTS = sorted(p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml"))


def compose_cfg(
    overrides: list[str],
    data_root: Path | None = None,
    output_dir: Path | None = None,
    config_name: str = "train",
) -> DictConfig:
    """The config an entry point would see, minus the `hydra` node (as in a run)."""
    cfg = compose_config(config_name, overrides, output_dir=output_dir or (data_root or Path.cwd()) / "run")
    if data_root is not None:
        with open_dict(cfg):
            cfg.paths.data_root = str(data_root)
    return cfg


def compose_choices(
    overrides: list[str], config_name: str = "train", config_dir: Path | None = None
) -> dict[str, str | None]:
    """The config group choices Hydra made for `overrides` (hydra.runtime.choices: group -> option), from
    conf/ or another `config_dir`."""
    cfg = compose_config(config_name, overrides, return_hydra_config=True, config_dir=config_dir)
    return dict(cfg.hydra.runtime.choices)
