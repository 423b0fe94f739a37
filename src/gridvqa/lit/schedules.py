"""Learning-rate schedules as LambdaLR multipliers (torch has no warm-up + multi-step in one)."""

from __future__ import annotations

from collections.abc import Sequence


def warmup_multistep(
    step: int, warmup_steps: int, milestones: Sequence[int], gamma: float = 0.1, warmup_factor: float = 0.001
) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from `warmup_factor`, x`gamma` at each milestone."""
    factor = 1.0
    if step < warmup_steps:
        alpha = step / max(1, warmup_steps)
        factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** sum(step >= m for m in milestones)
