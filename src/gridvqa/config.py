"""Where the Hydra configs live, so `python -m gridvqa.<entry>` finds `conf/` from any directory.

Hydra resolves a relative `config_path` against the file that declares `@hydra.main`; we hand it an
absolute path instead: `$GRIDVQA_CONF_DIR` when set, else the package's `conf/` (in a checkout a link to
the repository's `conf/`, so edits there apply; in an installed wheel, the copy shipped with it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def conf_dir() -> str:
    env = os.environ.get("GRIDVQA_CONF_DIR")
    path = Path(env) if env else (Path(__file__).parent / "conf").resolve()
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"{path}: gridvqa's Hydra configs not found; install with `make install` (editable) "
            "or set GRIDVQA_CONF_DIR to the repository's conf/ folder"
        )
    return str(path)


def compose_config(
    config_name: str,
    overrides: Sequence[str] = (),
    *,
    return_hydra_config: bool = False,
    output_dir: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
) -> DictConfig:
    """`config_name` composed with `overrides` (Hydra's override syntax) from conf/ (or `config_dir`), as
    an entry point composes it; the project's resolvers are registered first. Hydra's own errors (an
    unknown key, a bad override) propagate unchanged.

    With `output_dir`, the config is the one a run's task function sees: Hydra's runtime output dir set to
    `output_dir` (job number 0) and registered as the current `HydraConfig`, so `${hydra:...}`
    interpolations such as paths.output_dir resolve; the `hydra` node, read-only as in a run, is then
    dropped unless `return_hydra_config`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    # a Hydra left initialized (a previous compose, an interrupted test) would refuse a new one
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=list(overrides),
            return_hydra_config=return_hydra_config or output_dir is not None,
        )
    if output_dir is not None:
        _set_run_dir(cfg, output_dir, keep_hydra=return_hydra_config)
    return cfg


def _set_run_dir(cfg: DictConfig, output_dir: str | os.PathLike, keep_hydra: bool) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]


def _count_vocab_lines(path: str) -> int:
    """Number of classes in a one-class-per-line vocabulary file (blank lines ignored)."""
    from gridvqa.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: vocabulary file not found")
    return sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())


def _count_answers(path: str) -> int:
    from gridvqa.data.jsonio import load_json

    return len(
        load_json(path, "answer vocabulary (make it with: python -m gridvqa.data.prepare DATA_ROOT)")[
            "answers"
        ]
    )


def _feature_dim(path: str) -> int:
    """Width of the vectors stored in an HDF5 feature file (grid channels or region vector size)."""
    from gridvqa.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        kind, _, split = p.stem.partition("_")
        raise ConfigError(
            f"{p}: features not found (make them with: python -m gridvqa.extract kind={kind} split={split})"
        )
    from gridvqa.data.features import open_features

    reader = open_features(p)
    try:
        return int(reader.feature_dim)
    finally:
        reader.close()


def wandb_offline() -> bool:
    """wandb runs in its own offline mode unless a key is configured, so a run never blocks on the
    network: WANDB_API_KEY, or a `wandb login` entry in ~/.netrc; WANDB_MODE wins when set."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "disabled", "dryrun")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" not in netrc.read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return True


def launch_rank_suffix() -> str:
    """"_rank<N>" in the processes of a torchrun or SLURM launch other than rank 0, else "". Each of
    them composes its own config, so two started in the same second would share one run folder and log
    file; Lightning's own DDP children get rank 0's folder on their command line and never ask."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    return f"_rank{rank}" if rank and rank != "0" else ""


def register_resolvers() -> None:
    """OmegaConf resolvers so configs read vocabulary sizes from the data instead of constants."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("vocab_size"):
        OmegaConf.register_new_resolver("vocab_size", _count_vocab_lines, use_cache=True)
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("feature_dim"):
        OmegaConf.register_new_resolver("feature_dim", _feature_dim, use_cache=True)
    if not OmegaConf.has_resolver("num_answers"):
        OmegaConf.register_new_resolver("num_answers", _count_answers, use_cache=True)
    if not OmegaConf.has_resolver("launch_rank_suffix"):
        OmegaConf.register_new_resolver("launch_rank_suffix", launch_rank_suffix)


def to_plain(value):
    """OmegaConf containers -> plain dicts/lists (recursively), so checkpoints hold only types that
    `torch.load(..., weights_only=True)` accepts; anything else is returned unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value
