"""freeze_at holds in every VQA setting: the stem (and res2) the backbone froze keep requires_grad False,
stay out of the optimizer and are byte-identical after real Lightning training steps, while the trainable
stages change."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from gridvqa.lit.vqa_module import VQAModule
from hydra_utils import compose_cfg
from vqa_setup import bare_trainer, fit_on_one_thread

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# BN (not FrozenBN) so that the trainable stages have norm weights and running statistics that a step
# changes, and the frozen ones have BN turned FrozenBN by freeze_at: the strictest case.
TINY = ("data.num_workers=0", "data.batch_size=4", "data.image_size=[64,64]", "backbone.norm=BN",
        "backbone.weights=null", "model.lr=1e-2", "model.head.size=tiny")
FROZEN_BY = {1: ("body.conv1", "body.bn1"), 2: ("body.conv1", "body.bn1", "body.layer1")}


def build(root: Path, out: Path, *overrides: str) -> tuple[VQAModule, object]:
    cfg = compose_cfg([*TINY, *overrides], root, out / "run")
    pl.seed_everything(0)
    return instantiate(cfg.model), instantiate(cfg.data)


def fit(model: VQAModule, dm, steps: int = 2) -> pl.Trainer:
    trainer = bare_trainer(max_steps=steps)
    fit_on_one_thread(trainer, model, dm)
    return trainer


def is_frozen(name: str, freeze_at: int) -> bool:
    return any(name == p or name.startswith(p + ".") for p in FROZEN_BY[freeze_at])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_freeze_through_training(model: VQAModule, dm, freeze_at: int) -> None:
    bb = model.backbone
    params = dict(bb.named_parameters())
    frozen = {n for n in params if is_frozen(n, freeze_at)}
    assert frozen and "body.conv1.weight" in frozen  # the stem's conv is a parameter, frozen
    assert all(not params[n].requires_grad for n in frozen)
    assert all(p.requires_grad for n, p in params.items() if n not in frozen)  # res3+ (res2 for 1) train
    before = snapshot(bb)
    trainer = fit(model, dm)
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(params[n]) for n in frozen}
    assert all(id(p) in in_optimizer for n, p in params.items() if n not in frozen)
    after = bb.state_dict()
    for k, v in before.items():  # weights and statistics (FrozenBN buffers) of frozen stages: unchanged
        if is_frozen(k, freeze_at):
            assert torch.equal(after[k], v), k
    assert all(not params[n].requires_grad for n in frozen)  # still frozen after fit
    # and the trainable stages did learn: every res3+ conv moved
    for k in ("body.layer2.0.conv1.weight", "body.layer3.0.conv1.weight", "body.layer4.0.conv2.weight"):
        assert not torch.equal(after[k], before[k]), k
    if freeze_at == 1:
        assert not torch.equal(after["body.layer1.0.conv1.weight"], before["body.layer1.0.conv1.weight"])


@pytest.mark.parametrize("freeze_at", [1, 2])
def test_trainable_backbone_keeps_freeze_at(freeze_at, tiny_shapes, tmp_path):
    model, dm = build(tiny_shapes, tmp_path, f"backbone.freeze_at={freeze_at}",
                      "model.backbone_trainable=true")
    check_freeze_through_training(model, dm, freeze_at)


def test_frozen_backbone_is_not_trained(tiny_shapes, tmp_path):
    model, dm = build(tiny_shapes, tmp_path, "backbone.freeze_at=2", "model.backbone_trainable=false")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    before = snapshot(model.backbone)
    head_before = snapshot(model.head)
    trainer = fit(model, dm)
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.backbone.parameters()}
    after = model.backbone.state_dict()
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []  # BN statistics too
    assert any(not torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())


def test_finetune_from_a_frozen_checkpoint_keeps_freeze_at(tiny_shapes, tmp_path):
    frozen, dm = build(tiny_shapes, tmp_path / "frozen", "backbone.freeze_at=2",
                       "model.backbone_trainable=false")
    trainer = fit(frozen, dm, steps=1)
    ckpt = tmp_path / "frozen.ckpt"
    trainer.save_checkpoint(ckpt)
    model, dm = build(tiny_shapes, tmp_path / "finetune", "backbone.freeze_at=2",
                      "model.backbone_trainable=true", f"model.init_from={ckpt}")
    # init_from loaded the frozen run's weights
    assert torch.equal(model.backbone.body.conv1.weight, frozen.backbone.body.conv1.weight)
    check_freeze_through_training(model, dm, 2)
