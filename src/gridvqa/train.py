"""Training entry point: `python -m gridvqa.train experiment=NAME [overrides]` (Hydra; `-m` for sweeps).

Thin by design: everything is instantiated from `_target_` configs in `gridvqa.training.run`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gridvqa.config import conf_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from gridvqa.errors import find_user_error
    from gridvqa.training import run

    try:
        return run(cfg)
    except Exception as e:  # one line for the errors our code explains; a traceback for the rest
        user = find_user_error(e)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
