"""Convert official checkpoints into our backbone (and detector) as safetensors.

    python -m gridvqa.models.convert SRC DST [--arch R-50] [--allow-missing] [--stride-in-1x1|--stride-in-3x3]

Sources: grid-feats-vqa / detectron2 checkpoints (`{"model": sd}`, .pth or legacy numpy .pkl) and
torchvision / timm ImageNet ResNets. The key mappings are pure state-dict -> state-dict functions;
every key they do not place is reported. Our backbone is then built for `--arch` and loaded strictly,
so a wrong arch or a partial checkpoint fails here rather than giving silently wrong features.

The output records, in its safetensors metadata, where the stride sits (`stride_in_1x1`) and the pixel
normalisation the source was trained with (`pixel_norm`, see `default_pixel_norm`): every loader of the
file builds its image pipeline from it, so a converted X-101 gets its inputs divided by the ImageNet std
without any setting.

detectron2 heads follow other conventions than torchvision's detection code (RPN anchors size-major vs
ratio-major; background class last vs first): that mapping lives with the detector
(`gridvqa.models.detector.detectron2_heads_to_detector`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gridvqa.errors import ConfigError, GridVQAError

StateDict = dict[str, torch.Tensor]

_NORM = r"(weight|bias|running_mean|running_var)"
_STEM = r"^(?:backbone\.(?:bottom_up\.)?)?stem\.conv1\."  # plain, GeneralizedRCNN or FPN-wrapped
# C4 detectors (the region baseline) keep res5 in the RoI head: `roi_heads.res5.*`.
_BLOCK = r"^(?:(?:backbone\.(?:bottom_up\.)?)?res([2-5])|roi_heads\.res(5))\.(\d+)\."


def _layer(m: re.Match[str]) -> str:
    return f"body.layer{int(m[1] or m[2]) - 1}.{m[3]}"


_D2_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(_STEM + r"weight$"), lambda m: "body.conv1.weight"),
    (re.compile(_STEM + r"norm\." + _NORM + "$"), lambda m: f"body.bn1.{m[1]}"),
    (re.compile(_BLOCK + r"conv([123])\.weight$"), lambda m: f"{_layer(m)}.conv{m[4]}.weight"),
    (re.compile(_BLOCK + r"conv([123])\.norm\." + _NORM + "$"), lambda m: f"{_layer(m)}.bn{m[4]}.{m[5]}"),
    (re.compile(_BLOCK + r"shortcut\.weight$"), lambda m: f"{_layer(m)}.downsample.0.weight"),
    (re.compile(_BLOCK + r"shortcut\.norm\." + _NORM + "$"), lambda m: f"{_layer(m)}.downsample.1.{m[4]}"),
]
_TV_KEY = re.compile(
    r"^(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(conv[123]\.weight|bn[123]\.\w+|downsample\.[01]\.\w+))$"
)


def detectron2_to_backbone(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """detectron2 ResNet keys (`backbone.res2.0.conv1.norm.weight`, ...) -> ours (`body.layer1.0.bn1.weight`).

    Returns (converted, unmatched keys). BN step counters (`num_batches_tracked`) carry no weights and are
    dropped; everything else that is not a backbone weight (heads, deformable offsets) is unmatched.
    """
    out: StateDict = {}
    unmatched: list[str] = []
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, target in _D2_RULES:
            m = pattern.match(key)
            if m:
                if target(m) in out:  # two keys for one weight (e.g. backbone.res5 and roi_heads.res5)
                    unmatched.append(key)
                else:
                    out[target(m)] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def torchvision_to_backbone(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """torchvision / timm ResNet keys (`layer1.0.conv1.weight`, ...) -> ours (`body.layer1.0.conv1.weight`).

    Same module names, so only the prefix changes; `module.` (DataParallel) is stripped, the classifier
    (`fc.*`) is unmatched, `num_batches_tracked` dropped.
    """
    out: StateDict = {}
    unmatched: list[str] = []
    for key, value in sd.items():
        k = key.removeprefix("module.")
        if k.endswith("num_batches_tracked"):
            continue
        if _TV_KEY.match(k):
            out[f"body.{k}"] = value
        else:
            unmatched.append(key)
    return out, unmatched


def detect_source(sd: Mapping[str, torch.Tensor]) -> str:
    """'detectron2' or 'torchvision', from the key names."""
    if any(re.search(r"(^|\.)stem\.conv1\.weight$", k) for k in sd):
        return "detectron2"
    if any(k.removeprefix("module.") == "layer1.0.conv1.weight" for k in sd):
        return "torchvision"
    raise ConfigError("cannot tell the checkpoint's format: no detectron2 `stem.conv1.weight` and no "
                      "torchvision `layer1.0.conv1.weight` key")


def default_pixel_norm(arch: str, source: str) -> str:
    """The preset (gridvqa.data.images.PIXEL_NORMS) a checkpoint of `arch` from `source` was trained with.

    detectron2: FAIR's Caffe2 ResNeXts (X-101-32x8d, X-152-32x8d; grid-feats-vqa configs/X-101-grid.yaml
    sets PIXEL_STD to the ImageNet std) divide by the std, MSRA ResNets (R-*; configs/R-50-grid.yaml keeps
    detectron2's default std 1) have it folded into conv1. torchvision / timm: RGB 0-1, ImageNet mean/std.
    """
    if source == "torchvision":
        return "imagenet"
    return "detectron2_x101" if arch.startswith("X-") else "detectron2"


@dataclass
class ConvertResult:
    backbone_path: Path
    source: str
    stride_in_1x1: bool
    unmatched: list[str]
    missing: list[str]
    detector_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    pixel_norm: str = "detectron2"


def _detector_heads() -> Callable[[Mapping[str, torch.Tensor]], tuple[StateDict, list[str]]] | None:
    # Imported lazily: the detector is another module (and another engineer's); convert works without it.
    try:
        from gridvqa.models import detector
    except ImportError:
        return None
    return getattr(detector, "detectron2_heads_to_detector", None)


def _check_loads(arch: str, stride_in_1x1: bool, sd: StateDict, allow_missing: bool, src: Path) -> list[str]:
    """Build our backbone for `arch` and load `sd` into it; refuse wrong shapes, extra or missing weights."""
    from gridvqa.models.backbone import build_backbone

    model = build_backbone(arch, norm="FrozenBN", freeze_at=0, stride_in_1x1=stride_in_1x1,
                           out_features=("res5",))
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ConfigError(f"{src}: {len(bad)} weights do not fit arch {arch} (e.g. {bad[0]}); wrong --arch?")
    extra = [k for k in sd if k not in own]
    if extra:
        raise ConfigError(f"{src}: {len(extra)} backbone weights have no place in arch {arch} "
                          f"(e.g. {extra[0]}); wrong --arch?")
    missing = [k for k in own if k not in sd]
    if missing and not allow_missing:
        raise ConfigError(f"{src}: {len(missing)} backbone weights missing for arch {arch} "
                          f"(e.g. {missing[0]}); pass --allow-missing to write a partial checkpoint")
    model.load_state_dict(sd, strict=False)
    return missing


def _save(sd: StateDict, path: Path, meta: dict[str, object], pixel_norm: str) -> None:
    from gridvqa.data.images import PIXEL_NORMS
    from gridvqa.models.weights import pixel_norm_metadata, save_safetensors

    tensors = {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in sd.items()}
    metadata = {"gridvqa": json.dumps(meta), **pixel_norm_metadata(PIXEL_NORMS[pixel_norm])}
    save_safetensors(tensors, path, metadata=metadata)


def convert(
    src: str | Path,
    dst: str | Path,
    arch: str = "R-50",
    *,
    stride_in_1x1: bool | None = None,
    allow_missing: bool = False,
    source: str = "auto",
    detector_dst: str | Path | None = None,
    pixel_norm: str = "auto",
) -> ConvertResult:
    """Convert `src` into our backbone at `dst` (detectron2 sources: also our detector at detector_dst).

    `pixel_norm`: the preset the source was trained with (gridvqa.data.images.PIXEL_NORMS), recorded in
    the output; `auto` = `default_pixel_norm(arch, source)`.
    """
    from gridvqa.data.images import PIXEL_NORMS
    from gridvqa.models.backbone import ARCHS, default_stride_in_1x1
    from gridvqa.models.safe_load import load_state_dict_file

    src, dst = Path(src), Path(dst)
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r} unknown; registered: {', '.join(ARCHS)}")
    sd = load_state_dict_file(src)
    deform = [k for k in sd if "conv2_offset" in k]
    if deform:
        raise ConfigError(f"{src}: deformable convolutions ({deform[0]}, ...): X-152++ style checkpoints "
                          "are not supported by our backbone")
    kind = detect_source(sd) if source == "auto" else source
    if kind not in ("detectron2", "torchvision"):
        raise ConfigError(f"--source {source!r} unknown; choose auto, detectron2 or torchvision")
    if pixel_norm != "auto" and pixel_norm not in PIXEL_NORMS:
        raise ConfigError(f"--pixel-norm {pixel_norm!r} unknown; choose auto, {', '.join(PIXEL_NORMS)}")
    if stride_in_1x1 is None:
        stride_in_1x1 = default_stride_in_1x1(arch, kind)
    if pixel_norm == "auto":
        pixel_norm = default_pixel_norm(arch, kind)
    to_backbone = detectron2_to_backbone if kind == "detectron2" else torchvision_to_backbone
    backbone_sd, unmatched = to_backbone(sd)
    if not backbone_sd:
        raise ConfigError(f"{src}: no backbone weights found for a {kind} checkpoint")
    missing = _check_loads(arch, stride_in_1x1, backbone_sd, allow_missing, src)
    meta = {"arch": arch, "source": kind, "source_file": src.name, "stride_in_1x1": stride_in_1x1,
            "norm": "FrozenBN"}
    _save(backbone_sd, dst, {**meta, "content": "backbone"}, pixel_norm)
    result = ConvertResult(dst, kind, stride_in_1x1, unmatched, missing, pixel_norm=pixel_norm)

    if kind == "detectron2":
        heads = _detector_heads()
        if heads is None:
            result.notes.append("detector head mapping unavailable (gridvqa.models.detector."
                                "detectron2_heads_to_detector): wrote the backbone only")
        else:
            head_sd, head_unmatched = heads(sd)
            # A key is unmatched only if neither the backbone nor the head mapping placed it.
            result.unmatched = [k for k in unmatched if k in set(head_unmatched)]
            if head_sd:
                default = dst.with_name(f"{dst.stem}.detector{dst.suffix}")
                det_path = Path(detector_dst) if detector_dst else default
                det_sd = {**{f"backbone.{k}": v for k, v in backbone_sd.items()}, **head_sd}
                _save(det_sd, det_path, {**meta, "content": "detector"}, pixel_norm)
                result.detector_path = det_path
    return result


def _parser() -> argparse.ArgumentParser:
    from gridvqa.data.images import PIXEL_NORMS
    from gridvqa.models.backbone import ARCHS

    p = argparse.ArgumentParser(prog="python -m gridvqa.models.convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint to convert (.pth/.pkl/.safetensors)")
    p.add_argument("dst", help="output safetensors file of our backbone")
    p.add_argument("--arch", default="R-50", choices=list(ARCHS))
    p.add_argument("--source", default="auto", choices=["auto", "detectron2", "torchvision"])
    p.add_argument("--allow-missing", action="store_true", help="write even if backbone weights are missing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stride-in-1x1", dest="stride_in_1x1", action="store_true", default=None,
                   help="stride in each stage's first 1x1 conv (default for detectron2 R-*: MSRA weights)")
    g.add_argument("--stride-in-3x3", dest="stride_in_1x1", action="store_false",
                   help="stride in the 3x3 conv (default for X-* and torchvision/timm weights)")
    p.add_argument("--detector-out", default=None, help="detector output (default: DST stem + .detector)")
    p.add_argument("--pixel-norm", default="auto", choices=["auto", *PIXEL_NORMS],
                   help="the normalisation the source was trained with, recorded in the output (default: "
                        "detectron2 X-*: detectron2_x101, R-*: detectron2 (std 1); torchvision: imagenet)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        r = convert(args.src, args.dst, args.arch, stride_in_1x1=args.stride_in_1x1,
                    allow_missing=args.allow_missing, source=args.source, detector_dst=args.detector_out,
                    pixel_norm=args.pixel_norm)
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src} ({r.source}) -> {r.backbone_path} [arch {args.arch}, stride_in_1x1={r.stride_in_1x1}, "
          f"pixel_norm={r.pixel_norm}]")
    if r.detector_path:
        print(f"detector -> {r.detector_path}")
    for note in r.notes:
        print(f"note: {note}")
    if r.missing:
        print(f"{len(r.missing)} backbone weights missing (left out of the file):")
        print("\n".join(f"  {k}" for k in r.missing))
    print(f"{len(r.unmatched)} unmatched keys" + (":" if r.unmatched else ""))
    print("\n".join(f"  {k}" for k in r.unmatched))
    return 0


if __name__ == "__main__":
    sys.exit(main())
