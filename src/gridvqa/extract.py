"""Feature extraction: `python -m gridvqa.extract kind=grid|region [split=val] [overrides]` (Hydra).

Thin by design: the work is in `gridvqa.extraction.run`; config in conf/extract.yaml. Re-running the same
command continues an interrupted run; on a finished file it says there is nothing to do.
"""

from __future__ import annotations

from omegaconf import DictConfig

from gridvqa.cli import entry_point
from gridvqa.config_checks import check_extract


@entry_point("extract", check_extract)
def main(cfg: DictConfig) -> None:
    from gridvqa.extraction import run

    print(run(cfg).line())


if __name__ == "__main__":
    main()
