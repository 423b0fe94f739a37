"""The VQA optimizer's weight decay is decoupled from the gradient (AdamW), and the VQA settings use none.

Adam's L2 decay goes through its per-weight normalisation: where the loss's own gradient is small, as the
answer loss's is on a pre-trained backbone, each step moves every weight by about the learning rate
toward zero, and the backbone's last stage ends near zero after a CPU e2e run (docs/results.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from gridvqa.lit.vqa_module import VQAModule
from hydra_utils import compose_cfg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

TINY = ("data.num_workers=0", "data.image_size=[64,64]", "backbone.weights=null", "model.head.size=tiny",
        "model.backbone_trainable=true", "model.schedule=mcan")  # mcan: a schedule without a trainer


def build(root: Path, out: Path, *overrides: str) -> VQAModule:
    cfg = compose_cfg([*TINY, *overrides], root, out / "run")
    pl.seed_everything(0)
    return instantiate(cfg.model)


def step_without_gradient(model: VQAModule) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """One optimizer step with every gradient zero: what moves the weights is the decay alone."""
    opt = model.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    return opt, before


def test_backbone_decay_is_decoupled(tiny_shapes, tmp_path):
    model = build(tiny_shapes, tmp_path, "model.backbone_weight_decay=0.01", "model.lr=1e-2")
    opt, before = step_without_gradient(model)
    group = next(g for g in opt.param_groups if g["weight_decay"] == 0.01)
    ids = {id(p) for p in group["params"]}
    params = dict(model.backbone.named_parameters())
    conv = "body.layer4.0.conv2.weight"
    assert id(params[conv]) in ids
    # AdamW: w <- w (1 - lr wd); Adam's L2 would move each weight by about lr (here 50x as far)
    for name, w0 in before.items():
        if id(params[name]) in ids:
            torch.testing.assert_close(params[name].detach(), w0 * (1 - group["lr"] * 0.01))
        else:  # norm weights and biases: no decay
            assert torch.equal(params[name].detach(), w0), name


@pytest.mark.parametrize("experiment", ["e2e", "finetune"])
def test_trained_backbones_get_no_decay(experiment, tiny_shapes, tmp_path):
    model = build(tiny_shapes, tmp_path, f"experiment={experiment}", "model.init_from=null")
    assert model.hparams.weight_decay == 0.0 and model.hparams.backbone_weight_decay == 0.0
    _, before = step_without_gradient(model)
    params = dict(model.backbone.named_parameters())
    assert before and all(torch.equal(params[n].detach(), w0) for n, w0 in before.items())
