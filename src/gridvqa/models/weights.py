"""Saving weights as safetensors, atomically (a half-written file is never visible)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gridvqa.data.jsonio import atomic_write_bytes


def save_safetensors(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)
