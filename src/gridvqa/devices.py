"""Device choice shared by training-free entry points (extract, evaluate, predict, visualize, benchmarks)."""

from __future__ import annotations

import torch

from gridvqa.errors import ConfigError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto`/None -> cuda when available, else cpu; asking for a GPU that is not there is a ConfigError."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available (use device=auto or cpu)")
    return dev
