"""Evaluation entry point: `python -m gridvqa.evaluate ckpt_path=PATH split=val [out=PATH]` (Hydra).

Answers every question of the split, writes the results file and prints the official scorer's JSON
(also written beside the results file, `..._accuracy.json`, as the official tool names it);
on test splits (no annotations) it writes the file EvalAI accepts and says where: `split=test` for the
Test-Standard phase, `split=test-dev` for the Test-Dev phase (the model answers the test-dev questions and
the file still lists every test2015 question, as that phase requires). Logic: gridvqa.inference.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from gridvqa.cli import entry_point
from gridvqa.config_checks import check_evaluate


@entry_point("evaluate", check_evaluate)
def main(cfg: DictConfig) -> float | None:
    from gridvqa.errors import DataError
    from gridvqa.inference import evaluate_split

    res = evaluate_split(
        cfg.ckpt_path,
        cfg.paths.data_root,
        split=cfg.split,
        out=cfg.get("out"),
        output_dir=cfg.paths.output_dir,
        features=cfg.get("features"),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        device=cfg.get("device"),
    )
    if res.write_error is not None:  # the score was computed: print it before saying what failed
        if res.scores is not None:
            print(res.summary())
        raise DataError(res.write_error)
    print(res.summary())
    if res.scores is not None:
        print(f"results: {res.results_path}", file=sys.stderr)
        print(f"accuracy: {res.accuracy_path}", file=sys.stderr)
        return float(res.scores["overall"])
    return None


if __name__ == "__main__":
    main()
