"""Learning-rate schedules as LambdaLR multipliers (torch has no warm-up + multi-step in one)."""

from __future__ import annotations

import math
from collections.abc import Sequence

# VQA schedules: "mcan" counts whole epochs as mcan-vqa does; "fraction" places the same shape on the
# fraction of training done, so one config fits 13 epochs of VQA v2 and a few minutes on CPU.
VQA_SCHEDULES = ("mcan", "fraction")


def warmup_multistep(
    step: int, warmup_steps: int, milestones: Sequence[int], gamma: float = 0.1, warmup_factor: float = 0.001
) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from `warmup_factor`, x`gamma` at each milestone."""
    factor = 1.0
    if step < warmup_steps:
        alpha = step / max(1, warmup_steps)
        factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** sum(step >= m for m in milestones)


def mcan_epoch_factor(
    epoch: int, warmup_epochs: int = 3, decay_epochs: Sequence[int] = (10, 12), gamma: float = 0.2
) -> float:
    """mcan-vqa's schedule (core/model/optim.py WarmupOptimizer.rate, core/exec.py adjust_lr) for the
    0-based `epoch`: (e+1)/(warmup_epochs+1) of the rate while e < warmup_epochs (1/4, 2/4, 3/4 for 3),
    the full rate after, x`gamma` from each 0-based epoch listed in `decay_epochs` on ([10, 12]: the
    11th and 13th epochs, after 10 and 12 complete ones)."""
    warm = (epoch + 1) / (warmup_epochs + 1) if epoch < warmup_epochs else 1.0
    return warm * gamma ** sum(epoch >= d for d in decay_epochs)


def fraction_factor(progress: float, warmup: float, milestones: Sequence[float], gamma: float) -> float:
    """MCAN's shape on the fraction of training done: 4 equal steps (1/4, 2/4, 3/4, 1) over the first
    `warmup` fraction, then x`gamma` at each milestone fraction."""
    if progress < warmup:
        return (math.floor(4 * progress / warmup) + 1) / 4
    return gamma ** sum(progress >= m for m in milestones)
