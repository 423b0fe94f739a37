"""Evaluation entry point: `python -m gridvqa.evaluate ckpt_path=PATH split=val [out=PATH]` (Hydra).

Answers every question of the split, writes the results file and prints the official scorer's JSON;
on test splits (no annotations) it writes the file EvalAI accepts and says where. Logic: gridvqa.inference.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gridvqa.config import conf_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from gridvqa.errors import GridVQAError
    from gridvqa.inference import evaluate_split

    try:
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
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(res.summary())
    if res.scores is not None:
        print(f"results: {res.results_path}", file=sys.stderr)
        return float(res.scores["overall"])
    return None


if __name__ == "__main__":
    main()
