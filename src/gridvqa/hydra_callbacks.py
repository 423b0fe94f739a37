"""Hydra callbacks of the entry points (listed under `hydra.callbacks` in conf/hydra/default.yaml).

Hydra makes a run's folder (`hydra.run.dir`, by default under `paths.log_dir`) before the job's own
code and checks start, so a folder that cannot be made would end in Hydra's traceback. `CheckOutputDir`
looks first and stops with one line naming the key, the folder and why, exit status 1.

Light on purpose (omegaconf, Hydra and the standard library): it runs before every job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gridvqa.errors import ConfigError, one_line


def _resolved(config: DictConfig, key: str) -> str | None:
    try:
        value = OmegaConf.select(config, key, default=None)
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve: Hydra reports it itself
        return None
    return None if value is None else str(value)


def _inside(folder: Path, parent: Path) -> bool:
    return folder == parent or parent in folder.parents


def check_output_dir(config: DictConfig, key: str) -> None:
    """Raise a ConfigError if the folder at `key` (hydra.run.dir / hydra.sweep.dir) cannot be made or
    written; named as paths.log_dir when that is where it lies and what stops it."""
    from gridvqa.config_checks import check_writable

    folder = _resolved(config, key)
    if folder is None:
        return
    run_dir = Path(folder).absolute()
    log_dir = _resolved(config, "paths.log_dir")
    if log_dir is not None and _inside(run_dir, Path(log_dir).absolute()):
        check_writable(log_dir, "paths.log_dir", folder=True)
    check_writable(run_dir, key, folder=True)


class CheckOutputDir(Callback):
    """Stop, with one line and exit status 1, before Hydra fails to make the run or sweep folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            check_output_dir(config, key)
        except ConfigError as e:
            # Hydra turns an exception raised here into a warning and goes on to fail: exit instead
            from gridvqa.cli import exit_with_error

            exit_with_error(one_line(str(e)))
