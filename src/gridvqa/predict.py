"""Prediction entry point: `python -m gridvqa.predict ckpt_path=PATH image=PATH question="..." [topk=5]`.

Prints the top-k answers, one per line as `probability  answer`. Hydra reads the overrides, so quote a
question holding commas or apostrophes twice: 'question="what's left of the circle, red or blue?"'.
Logic: gridvqa.inference.predict.
"""

from __future__ import annotations

from omegaconf import DictConfig

from gridvqa.cli import entry_point
from gridvqa.config_checks import check_predict


@entry_point("predict", check_predict)
def main(cfg: DictConfig) -> None:
    from gridvqa.errors import ConfigError
    from gridvqa.inference import predict

    if cfg.get("image") is None:
        raise ConfigError("no image given: add image=PATH")
    question = "" if cfg.get("question") is None else str(cfg.question)
    answers = predict(cfg.ckpt_path, str(cfg.image), question, topk=int(cfg.topk), device=cfg.get("device"))
    for answer, prob in answers:
        print(f"{prob:.4f}  {answer}")


if __name__ == "__main__":
    main()
