"""Where the Hydra configs live, so `python -m gridvqa.<entry>` finds `conf/` from any directory.

Hydra resolves a relative `config_path` against the file that declares `@hydra.main`; we hand it an
absolute path instead: `$GRIDVQA_CONF_DIR` when set, else the repository's `conf/` (the README's
editable install keeps the package next to it).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def conf_dir() -> str:
    env = os.environ.get("GRIDVQA_CONF_DIR")
    path = Path(env) if env else REPO_ROOT / "conf"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"{path}: gridvqa's Hydra configs not found; install with `make install` (editable) "
            "or set GRIDVQA_CONF_DIR to the repository's conf/ folder"
        )
    return str(path)
