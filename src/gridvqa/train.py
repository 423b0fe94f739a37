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
    from gridvqa.errors import GridVQAError
    from gridvqa.training import run

    try:
        return run(cfg)
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
