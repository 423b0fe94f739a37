"""Training entry point: `python -m gridvqa.train experiment=NAME [overrides]` (Hydra; `-m` for sweeps).

Thin by design: everything is instantiated from `_target_` configs in `gridvqa.training.run`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from gridvqa.cli import entry_point
from gridvqa.config_checks import check_train


@entry_point("train", check_train)
def main(cfg: DictConfig) -> float | None:
    from gridvqa.training import run

    return run(cfg)


if __name__ == "__main__":
    main()
