"""Detector pre-training optimiser choice: SGD (the detectron2 recipe, default) or AdamW."""

from __future__ import annotations

import pytest
import torch

from gridvqa.errors import ConfigError
from gridvqa.lit.detection_module import DetectionModule

BACKBONE = dict(name="R-tiny", norm="BN", freeze_at=0, res5_dilation=2)
DETECTOR = dict(anchor_sizes=[16, 32, 64], fc_dim=32, batch_size_per_image=16)


def _module(**kw) -> DetectionModule:
    torch.manual_seed(0)
    return DetectionModule("grid", BACKBONE, DETECTOR, num_classes=3, num_attributes=2, **kw)


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [60.0, 20.0, 90.0, 50.0]]),
         "labels": torch.tensor([1, 3]), "attributes": torch.tensor([[0], [1]])},
        {"boxes": torch.tensor([[30.0, 30.0, 70.0, 70.0]]), "labels": torch.tensor([2]),
         "attributes": torch.tensor([[1]])},
    ]


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_choice_and_decay_groups(name, cls):
    module = _module(optimizer=name, lr=1e-3, weight_decay=1e-4)
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == pytest.approx(1e-3 / 1000) for g in opt.param_groups)  # warm-up starts low
    n_trainable = sum(1 for p in module.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable


def test_adamw_steps_lower_the_detector_loss():
    module = _module(optimizer="adamw", lr=3e-3, warmup_steps=0)
    opt = module.configure_optimizers()["optimizer"]
    images = torch.randn(2, 3, 96, 96)
    images[0, :, 8:40, 8:40] += 3.0
    images[1, :, 30:70, 30:70] -= 3.0
    sizes = [(96, 96), (96, 96)]
    losses = []
    for _ in range(8):
        torch.manual_seed(1)  # same RoI sampling each step: the loss change is the optimiser's doing
        loss = sum(module.detector(images, sizes, _targets()).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer 'lamb' unknown"):
        _module(optimizer="lamb")
