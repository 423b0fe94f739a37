"""Where the Hydra configs live, so `python -m gridvqa.<entry>` finds `conf/` from any directory.

Hydra resolves a relative `config_path` against the file that declares `@hydra.main`; we hand it an
absolute path instead: `$GRIDVQA_CONF_DIR` when set, else the package's `conf/` (in a checkout a link to
the repository's `conf/`, so edits there apply; in an installed wheel, the copy shipped with it).
"""

from __future__ import annotations

import os
from pathlib import Path

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
