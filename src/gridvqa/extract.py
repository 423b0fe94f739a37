"""Feature extraction: `python -m gridvqa.extract kind=grid|region [split=val] [overrides]` (Hydra).

Thin by design: the work is in `gridvqa.extraction.run`; config in conf/extract.yaml. Re-running the same
command continues an interrupted run; on a finished file it says there is nothing to do.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gridvqa.config import conf_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="extract")
def main(cfg: DictConfig) -> None:
    from gridvqa.errors import GridVQAError
    from gridvqa.extraction import run

    try:
        summary = run(cfg)
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(summary.line())


if __name__ == "__main__":
    main()
