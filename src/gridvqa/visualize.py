"""Attention pictures: `python -m gridvqa.visualize ckpt_path=PATH split=val num=8 out=DIR` (Hydra).

Writes one PNG per question (`question_<id>.png`): the image with the model's attention, its top answers
and the human answers; `image=PATH question="..."` draws one image and a question of your own instead.
`compare=[{ckpt_path:..,features:..}]` draws more models (e.g. a region baseline) beside the first.
Logic: gridvqa.viz.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from gridvqa.cli import entry_point
from gridvqa.config_checks import check_visualize


@entry_point("visualize", check_visualize)
def main(cfg: DictConfig) -> None:
    from gridvqa.errors import ConfigError
    from gridvqa.viz import load_views, object_names, write_pair_picture, write_split_pictures

    pair = cfg.get("image") is not None or cfg.get("question") is not None
    if pair and (cfg.get("image") is None or not cfg.get("question")):
        raise ConfigError('give both image=PATH and question="..." (or neither, to draw a split)')
    specs = [{"ckpt_path": cfg.ckpt_path, "features": cfg.get("features")}]
    if cfg.get("compare"):
        specs += OmegaConf.to_container(cfg.compare, resolve=True)
    views = load_views(specs, device=cfg.get("device"), data_root=cfg.paths.data_root,
                       split=None if pair else str(cfg.split))
    common = {"which": cfg.attention, "layer": int(cfg.layer), "token": cfg.get("token"),
              "topk": int(cfg.topk)}
    if pair:
        paths = [write_pair_picture(views, str(cfg.image), str(cfg.question), cfg.out,
                                    image_id=cfg.get("image_id"),
                                    label_names=object_names(cfg.paths.data_root), **common)]
    else:
        ids = cfg.get("question_ids")
        paths = write_split_pictures(views, cfg.paths.data_root, str(cfg.split), cfg.out,
                                     num=int(cfg.num), question_ids=list(ids) if ids else None,
                                     seed=cfg.get("seed"), **common)
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
