"""ResNet / ResNeXt grid backbone built on timm, with detectron2 semantics where the recipe needs them.

The network is a plain `timm.models.resnet.ResNet` kept as `self.body` (state-dict keys `body.conv1.weight`,
`body.layer1.0.conv1.weight`, ...). On top of timm we add what detectron2's ResNet has and timm lacks:
FrozenBN chosen by string, `freeze_at`, stride placed in the 1x1 conv (MSRA weights), and a res5
dilation that dilates *every* res5 block (timm's `output_stride=16` leaves the first one undilated).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import freeze_batch_norm_2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from gridvqa.errors import ConfigError

log = logging.getLogger(__name__)

# name -> timm ResNet kwargs. Adding an architecture is one line here.
ARCHS: dict[str, dict[str, Any]] = {
    "R-18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "R-50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "R-101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    "X-101-32x8d": dict(block=Bottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=8),
    "X-152-32x8d": dict(block=Bottleneck, layers=(3, 8, 36, 3), cardinality=32, base_width=8),
    # Small ones for CPU runs and tests. timm honours `stem_width` only for deep stems, so the 7x7 stem
    # of these stays 64 wide (a 3->64 conv is cheap; keeping the detectron2 stem layout matters more).
    "R-tiny": dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256)),
    "R-tiny-bottleneck": dict(block=Bottleneck, layers=(1, 1, 1, 2), channels=(16, 32, 64, 128)),
    "X-tiny": dict(block=Bottleneck, layers=(1, 1, 1, 2), channels=(16, 32, 64, 128), cardinality=4,
                   base_width=16),
}

STAGE_NAMES: tuple[str, ...] = ("res2", "res3", "res4", "res5")
_TIMM_STAGE = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
NORMS = ("FrozenBN", "BN", "GN")


def default_stride_in_1x1(arch: str, source: str = "detectron2") -> bool:
    """Where pretrained weights put the stride: MSRA R-* (detectron2) in the 1x1, ResNeXt and torchvision/timm
    ImageNet weights (ResNet v1.5) in the 3x3."""
    return source == "detectron2" and arch.startswith("R-")


@dataclass(frozen=True)
class ShapeSpec:
    channels: int
    stride: int


class FrozenBN(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d in the input's dtype (as detectron2's): torchvision's keeps float32
    buffers, so under bf16 autocast every BN turned the activations back into float32 and training ran at
    float32's memory traffic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + bias.to(x.dtype).reshape(1, -1, 1, 1)


def _frozen_bn(num_features: int, device: Any = None, dtype: Any = None) -> nn.Module:
    # timm passes device/dtype to norm layers; torchvision's FrozenBatchNorm2d takes neither.
    return FrozenBN(num_features, eps=1e-5).to(device=device, dtype=dtype)


def _group_norm(num_channels: int, device: Any = None, dtype: Any = None) -> nn.Module:
    # 32 groups as detectron2, fewer for the tiny CPU archs whose widths 32 does not divide.
    groups = math.gcd(32, num_channels)
    return nn.GroupNorm(groups, num_channels, eps=1e-5, device=device, dtype=dtype)


def _norm_layer(norm: str) -> Callable[..., nn.Module] | type[nn.Module]:
    if norm == "FrozenBN":
        return _frozen_bn
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "GN":
        return _group_norm
    raise ConfigError(f"backbone norm {norm!r} unknown; choose one of {', '.join(NORMS)}")


class ResNetBackbone(nn.Module):
    """A timm ResNet as a detectron2-style backbone: named feature maps res2..res5 and their shapes."""

    def __init__(
        self,
        body: ResNet,
        *,
        arch: str = "",
        norm: str = "FrozenBN",
        out_features: Sequence[str] = ("res5",),
        stride_in_1x1: bool = False,
        res5_dilation: int = 1,
        freeze_at: int = 2,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown or not out_features:
            raise ConfigError(f"backbone out_features {list(out_features)} invalid; "
                              f"choose from {STAGE_NAMES}")
        self.body = body
        self.arch = arch
        self.norm = norm
        self.stage_names: tuple[str, ...] = STAGE_NAMES
        self.out_features: tuple[str, ...] = tuple(sorted(out_features, key=STAGE_NAMES.index))
        self.stride_in_1x1 = stride_in_1x1
        self.grad_checkpointing = grad_checkpointing
        self.channels_last = False
        self.freeze_at = 0
        self._bottleneck = isinstance(self.body.layer1[0], Bottleneck)
        # timm's feature_info: stem ('act1') then one entry per stage, strides at res5 dilation 1.
        info = {d["module"]: d for d in self.body.feature_info}
        self._base_shapes = {
            s: ShapeSpec(int(info[_TIMM_STAGE[s]]["num_chs"]), int(info[_TIMM_STAGE[s]]["reduction"]))
            for s in STAGE_NAMES
        }
        if stride_in_1x1 and self._bottleneck:
            self._move_stride_to_1x1()
        self.res5_dilation = 1
        self.set_res5_dilation(res5_dilation)
        self.freeze(freeze_at)

    # -- structure -------------------------------------------------------------------------------------
    def stage(self, name: str) -> nn.Sequential:
        if name not in _TIMM_STAGE:
            raise ConfigError(f"backbone stage {name!r} unknown; choose from {STAGE_NAMES}")
        return getattr(self.body, _TIMM_STAGE[name])

    @property
    def res5(self) -> nn.Module:
        """The res5 stage; callable on res4 maps (the C4 detector runs it per pooled region)."""
        return self.body.layer4

    def _move_stride_to_1x1(self) -> None:
        # detectron2 `stride_in_1x1`: each stage's first block strides in conv1 (1x1) instead of conv2 (3x3).
        for name in STAGE_NAMES:
            first = self.stage(name)[0]
            if first.conv2.stride != (1, 1):
                first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)

    def set_res5_dilation(self, d: int) -> None:
        """Dilate every res5 block's 3x3 conv by `d` (1 or 2); d=2 also drops res5's stride (stride 16).

        Same weights either way: pre-training runs dilated, extraction undilated (the recipe's choice).
        """
        if d not in (1, 2):
            raise ConfigError(f"res5 dilation must be 1 or 2, got {d}")
        stride = 2 if d == 1 else 1
        for i, block in enumerate(self.res5):
            convs3 = [block.conv2] if self._bottleneck else [block.conv1, block.conv2]
            for conv in convs3:
                conv.dilation, conv.padding = (d, d), (d, d)
            if i == 0:
                strided = block.conv1 if (self.stride_in_1x1 or not self._bottleneck) else block.conv2
                strided.stride = (stride, stride)
                if block.downsample is not None:
                    block.downsample[0].stride = (stride, stride)
        self.res5_dilation = d

    def freeze(self, freeze_at: int) -> None:
        """Freeze the stem (1) and stages up to res{freeze_at} as detectron2: no grads, BN turned FrozenBN.

        Freezing only adds (rebuild to unfreeze). Call it before making the optimizer: BN parameters of
        frozen stages become FrozenBN buffers.
        """
        if not 0 <= freeze_at <= 5:
            raise ConfigError(f"freeze_at must be in 0..5 (0 = nothing, 1 = stem, 5 = all), got {freeze_at}")
        groups: list[tuple[str, list[str]]] = [("stem", ["conv1", "bn1"])]
        groups += [(s, [_TIMM_STAGE[s]]) for s in STAGE_NAMES]
        for _, names in groups[:freeze_at]:
            for n in names:
                module = freeze_batch_norm_2d(getattr(self.body, n))
                setattr(self.body, n, module)
                for p in module.parameters():
                    p.requires_grad_(False)
        self.freeze_at = max(self.freeze_at, freeze_at)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in backward instead of storing its activations (training only).

        With trainable BN the recomputation updates running statistics a second time; FrozenBN / GN are exact.
        """
        self.grad_checkpointing = enable

    def set_channels_last(self, enable: bool = True) -> None:
        """Keep weights and inputs NHWC (faster convs on GPUs with tensor cores); results are the same."""
        fmt = torch.channels_last if enable else torch.contiguous_format
        self.to(memory_format=fmt)
        self.channels_last = enable

    def fold_batch_norm(self) -> int:
        """Fold every BN (FrozenBN, or BN in eval mode) into the convolution before it, for inference.

        The conv takes the BN's affine map as its weight scale and bias and the BN becomes an Identity: the
        same features up to float rounding, without the BN's elementwise passes over every map (about a
        fifth of a ResNet-50 forward's time on a CPU). The state dict changes (conv biases, no BN buffers),
        so fold a model that is used, not one that is trained or saved. GN, whose statistics are per image,
        stays. Returns how many BNs were folded.
        """
        if self.training:
            raise ValueError("fold_batch_norm: the backbone is in training mode; BN folding is for inference")
        b = self.body
        pairs: list[tuple[nn.Module, str, str]] = [(b, "conv1", "bn1")]
        for name in STAGE_NAMES:
            for block in self.stage(name):
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        folded = 0
        for parent, conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                bn.eps, bn.weight, bn.bias)
            conv.weight = nn.Parameter(weight.detach().contiguous(memory_format=fmt), requires_grad=False)
            conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
            setattr(parent, bn_name, nn.Identity())
            folded += 1
        return folded

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and strides of every stage: timm's feature_info, adjusted for res5 dilation."""
        shapes = dict(self._base_shapes)
        if self.res5_dilation > 1:
            shapes["res5"] = ShapeSpec(shapes["res5"].channels, shapes["res4"].stride)
        return shapes

    # -- forward ---------------------------------------------------------------------------------------
    def _stem(self, x: Tensor) -> Tensor:
        b = self.body
        return b.maxpool(b.act1(b.bn1(b.conv1(x))))

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        stage = self.stage(name)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"backbone expects images as (N, C, H, W), got shape {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The maps named in out_features; stages after the last one are not run."""
        x = self._stem(self._prepare(x))
        out: dict[str, Tensor] = {}
        for name in STAGE_NAMES[: STAGE_NAMES.index(self.out_features[-1]) + 1]:
            x = self._run_stage(name, x)
            if name in self.out_features:
                out[name] = x
        return out

    def forward_until(self, x: Tensor, name: str) -> Tensor:
        """Stem through stage `name` (e.g. "res4" for the C4 detector)."""
        if name not in STAGE_NAMES:
            raise ConfigError(f"backbone stage {name!r} unknown; choose from {STAGE_NAMES}")
        x = self._stem(self._prepare(x))
        for s in STAGE_NAMES[: STAGE_NAMES.index(name) + 1]:
            x = self._run_stage(s, x)
        return x

    # -- weights ---------------------------------------------------------------------------------------
    def load_weights(self, path: str | os.PathLike, strict: bool = True) -> tuple[list[str], list[str]]:
        """Load a safetensors (or .pth) file of this backbone; keys `body.*` (or `backbone.body.*`).

        Missing keys raise ConfigError unless strict=False; unexpected keys are logged. Returns both lists.
        """
        from gridvqa.models.safe_load import load_state_dict_file

        meta = _safetensors_meta(path)
        if self._bottleneck and "stride_in_1x1" in meta and bool(meta["stride_in_1x1"]) != self.stride_in_1x1:
            # The same tensors give different features with the stride moved: fail loudly, not silently.
            raise ConfigError(f"{path}: weights expect stride_in_1x1={meta['stride_in_1x1']} but the "
                              f"backbone was built with stride_in_1x1={self.stride_in_1x1}")
        sd = load_state_dict_file(path)
        if not any(k.startswith("body.") for k in sd) and any(k.startswith("backbone.body.") for k in sd):
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        own = self.state_dict()
        bad = [f"{k} {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
               for k, v in sd.items() if k in own and v.shape != own[k].shape]
        if bad:
            raise ConfigError(f"{path}: {len(bad)} weights have the wrong shape for {self.arch or 'this'} "
                              f"backbone, e.g. {bad[0]}")
        result = self.load_state_dict(sd, strict=False)
        # BN's step counter carries no weights: a FrozenBN file lacks it and that is fine.
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        unexpected = list(result.unexpected_keys)
        if unexpected:
            log.warning("%s: %d unexpected keys ignored: %s", path, len(unexpected), ", ".join(unexpected))
        if missing:
            if strict:
                raise ConfigError(f"{path}: {len(missing)} backbone weights missing (e.g. {missing[0]}); "
                                  "pass strict=False to allow")
            log.warning("%s: %d backbone weights missing: %s", path, len(missing), ", ".join(missing))
        return missing, unexpected


def _safetensors_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The json entry `gridvqa` that convert writes into safetensors metadata ({} if absent)."""
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("gridvqa")
    except (SafetensorError, OSError):
        return {}  # load_state_dict_file reports the unreadable file with its own message
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def build_backbone(
    name: str,
    *,
    norm: str = "FrozenBN",
    freeze_at: int = 2,
    res5_dilation: int = 1,
    stride_in_1x1: bool = False,
    out_features: Sequence[str] = ("res5",),
    grad_checkpointing: bool = False,
    channels_last: bool = False,
    weights: str | os.PathLike | None = None,
    strict: bool = True,
) -> ResNetBackbone:
    """Build a registered ResNet/ResNeXt (see ARCHS) as a ResNetBackbone; optionally load local weights."""
    if name not in ARCHS:
        raise ConfigError(f"backbone {name!r} unknown; registered: {', '.join(ARCHS)}")
    # num_classes=0 / global_pool='' drop timm's head: the backbone ends at res5.
    body = ResNet(**ARCHS[name], num_classes=0, global_pool="", norm_layer=_norm_layer(norm))
    model = ResNetBackbone(
        body,
        arch=name,
        norm=norm,
        out_features=out_features,
        stride_in_1x1=stride_in_1x1,
        res5_dilation=res5_dilation,
        freeze_at=0,
        grad_checkpointing=grad_checkpointing,
    )
    if weights is not None:
        model.load_weights(weights, strict=strict)
    # Freeze after loading so frozen stages turned FrozenBN keep the loaded statistics.
    model.freeze(freeze_at)
    if channels_last:
        model.set_channels_last(True)
    return model
