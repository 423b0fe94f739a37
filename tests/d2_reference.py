"""detectron2's ResNet written from its definition (BasicStem, BottleneckBlock, FrozenBN), with random
detectron2-named weights: the independent side of the conversion and extraction checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# detectron2-style ResNets: (blocks per stage, bottleneck "planes", groups, base width). The small ones
# mirror the registry entries R-tiny-bottleneck (MSRA-like, stride in 1x1) and X-tiny (ResNeXt);
# X-101-32x8d is grid-feats-vqa's backbone (configs/X-101-grid.yaml: 32 groups x 8).
SPECS = {
    "R-tiny-bottleneck": dict(blocks=(1, 1, 1, 2), planes=(16, 32, 64, 128), groups=1, base_width=64),
    "X-tiny": dict(blocks=(1, 1, 1, 2), planes=(16, 32, 64, 128), groups=4, base_width=16),
    "X-101-32x8d": dict(blocks=(3, 4, 23, 3), planes=(64, 128, 256, 512), groups=32, base_width=8),
}


def make_d2_state(blocks, planes, groups, base_width, seed=0, residual_scale=1.0) -> dict[str, torch.Tensor]:
    """Random detectron2 ResNet weights with non-trivial FrozenBN statistics. `residual_scale` < 1 shrinks
    each block's last BN, so that 33 random blocks (X-101) keep activations in a sane range."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int, gain: float = 1.0) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
        sd[f"{name}.norm.weight"] = (torch.rand(cout, generator=g) + 0.5) * gain
        sd[f"{name}.norm.bias"] = torch.randn(cout, generator=g) * 0.1 * gain
        sd[f"{name}.norm.running_mean"] = torch.randn(cout, generator=g) * 0.2
        sd[f"{name}.norm.running_var"] = torch.rand(cout, generator=g) * 1.5 + 0.5

    conv("backbone.stem.conv1", 64, 3, 7)
    cin = 64
    for stage, (n, pl) in enumerate(zip(blocks, planes, strict=True), start=2):
        width, cout = pl * base_width // 64 * groups, pl * 4
        for i in range(n):
            p = f"backbone.res{stage}.{i}"
            if cin != cout:  # detectron2 adds a projection shortcut only when channels change
                conv(f"{p}.shortcut", cout, cin, 1)
            conv(f"{p}.conv1", width, cin, 1)
            conv(f"{p}.conv2", width, width // groups, 3)
            conv(f"{p}.conv3", cout, width, 1, gain=residual_scale)
            cin = cout
    return sd


def _conv_frozen_bn(x, sd, name, stride=1, padding=0, dilation=1, groups=1):
    x = F.conv2d(x, sd[f"{name}.weight"], stride=stride, padding=padding, dilation=dilation, groups=groups)
    scale = sd[f"{name}.norm.weight"] * (sd[f"{name}.norm.running_var"] + 1e-5).rsqrt()
    shift = sd[f"{name}.norm.bias"] - sd[f"{name}.norm.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


@torch.no_grad()
def d2_reference(sd, x, blocks, groups, stride_in_1x1, res5_dilation) -> dict[str, torch.Tensor]:
    """detectron2 ResNet forward (BasicStem + BottleneckBlock, FrozenBN), written from its definition."""
    x = F.relu(_conv_frozen_bn(x, sd, "backbone.stem.conv1", stride=2, padding=3))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    out = {}
    for stage, n in zip(range(2, 6), blocks, strict=True):
        dil = res5_dilation if stage == 5 else 1
        first_stride = 1 if stage == 2 or dil == 2 else 2
        for i in range(n):
            p = f"backbone.res{stage}.{i}"
            s = first_stride if i == 0 else 1
            s1, s3 = (s, 1) if stride_in_1x1 else (1, s)
            short = _conv_frozen_bn(x, sd, f"{p}.shortcut", stride=s) if f"{p}.shortcut.weight" in sd else x
            y = F.relu(_conv_frozen_bn(x, sd, f"{p}.conv1", stride=s1))
            y = _conv_frozen_bn(y, sd, f"{p}.conv2", stride=s3, padding=dil, dilation=dil, groups=groups)
            y = F.relu(y)
            y = _conv_frozen_bn(y, sd, f"{p}.conv3")
            x = F.relu(y + short)
        out[f"res{stage}"] = x
    return out
