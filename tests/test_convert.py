"""Checkpoint conversion and safe loading.

The key test builds a detectron2-named state dict, converts it, and checks our backbone against an
independent functional re-implementation of detectron2's ResNet (BottleneckBlock, FrozenBN,
stride_in_1x1, res5 dilation) written here.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open

from gridvqa.errors import ConfigError, DataError
from gridvqa.models.backbone import build_backbone
from gridvqa.models.convert import detectron2_to_backbone, main, torchvision_to_backbone
from gridvqa.models.safe_load import UnsafePickleError, load_state_dict_file

# Small detectron2-style ResNets: (blocks per stage, bottleneck "planes", groups, base width).
# They mirror the registry entries R-tiny-bottleneck (MSRA-like, stride in 1x1) and X-tiny (ResNeXt).
SPECS = {
    "R-tiny-bottleneck": dict(blocks=(1, 1, 1, 2), planes=(16, 32, 64, 128), groups=1, base_width=64),
    "X-tiny": dict(blocks=(1, 1, 1, 2), planes=(16, 32, 64, 128), groups=4, base_width=16),
}


def make_d2_state(blocks, planes, groups, base_width, seed=0) -> dict[str, torch.Tensor]:
    """Random detectron2 ResNet weights with non-trivial FrozenBN statistics."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
        sd[f"{name}.norm.weight"] = torch.rand(cout, generator=g) + 0.5
        sd[f"{name}.norm.bias"] = torch.randn(cout, generator=g) * 0.1
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
            conv(f"{p}.conv3", cout, width, 1)
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


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def _write(sd: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    if fmt == "pth":
        torch.save({"model": sd, "__author__": "test"}, path)
    else:  # detectron2 model-zoo style: pickled dict of numpy arrays
        with path.open("wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "test"}, f, protocol=2)
    return path


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["gridvqa"])


@pytest.mark.parametrize("fmt", ["pth", "pkl"])
@pytest.mark.parametrize("arch,stride_in_1x1", [("R-tiny-bottleneck", True), ("X-tiny", False)])
def test_detectron2_checkpoint_reproduces_reference(tmp_path, capsys, arch, stride_in_1x1, fmt):
    spec = SPECS[arch]
    sd = make_d2_state(**spec)
    sd["some_unknown.weight"] = torch.zeros(3)
    src = _write(sd, tmp_path / f"ckpt.{fmt}", fmt)
    dst = tmp_path / "out" / "bb.safetensors"
    assert main([str(src), str(dst), "--arch", arch]) == 0
    printed = capsys.readouterr().out
    assert f"stride_in_1x1={stride_in_1x1}" in printed and "some_unknown.weight" in printed
    meta = _meta(dst)
    assert meta["arch"] == arch and meta["stride_in_1x1"] is stride_in_1x1 and meta["norm"] == "FrozenBN"
    assert meta["source"] == "detectron2"
    assert not [p for p in dst.parent.iterdir() if p.name.endswith(".tmp")]

    x = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(3)) * 50
    model = build_backbone(arch, weights=dst, stride_in_1x1=stride_in_1x1,
                           out_features=("res2", "res3", "res4", "res5")).eval()
    for dilation in (1, 2):
        model.set_res5_dilation(dilation)
        ref = d2_reference(sd, x, spec["blocks"], spec["groups"], stride_in_1x1, dilation)
        with torch.no_grad():
            got = model(x)
        for name in ref:
            _close(got[name], ref[name])
    # The comparison can tell stride placements apart (so the check above means something).
    wrong = d2_reference(sd, x, spec["blocks"], spec["groups"], not stride_in_1x1, 1)["res5"]
    model.set_res5_dilation(1)
    with torch.no_grad():
        assert not torch.allclose(model(x)["res5"], wrong, rtol=1e-3, atol=1e-3)


def test_stride_override_flag(tmp_path):
    sd = make_d2_state(**SPECS["R-tiny-bottleneck"])
    src = _write(sd, tmp_path / "r.pth", "pth")
    dst = tmp_path / "bb.safetensors"
    assert main([str(src), str(dst), "--arch", "R-tiny-bottleneck", "--stride-in-3x3"]) == 0
    assert _meta(dst)["stride_in_1x1"] is False


@torch.no_grad()
def test_torchvision_resnet50_converts_and_matches(tmp_path, capsys):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    g = torch.Generator().manual_seed(1)
    for m in tv.modules():  # non-trivial statistics, and no zero-init of the last BN of each block
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    src = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), src)
    dst = tmp_path / "r50.safetensors"
    assert main([str(src), str(dst), "--arch", "R-50"]) == 0
    printed = capsys.readouterr().out
    assert "fc.weight" in printed and "fc.bias" in printed and "stride_in_1x1=False" in printed
    assert _meta(dst)["source"] == "torchvision"
    ours = build_backbone("R-50", weights=dst).eval()
    x = torch.randn(1, 3, 64, 64, generator=g)
    ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    _close(ours(x)["res5"], ref)


def test_missing_weights_refused_unless_allowed(tmp_path, capsys):
    sd = make_d2_state(**SPECS["X-tiny"])
    del sd["backbone.res5.1.conv2.weight"]
    src = _write(sd, tmp_path / "partial.pth", "pth")
    dst = tmp_path / "bb.safetensors"
    assert main([str(src), str(dst), "--arch", "X-tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "partial.pth" in err
    assert "missing" in err and "--allow-missing" in err
    assert not dst.exists()
    assert main([str(src), str(dst), "--arch", "X-tiny", "--allow-missing"]) == 0
    assert "body.layer4.1.conv2.weight" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="missing"):
        build_backbone("X-tiny", weights=dst)
    build_backbone("X-tiny", weights=dst, strict=False)


@pytest.mark.parametrize("case,arch,message", [
    ("deformable", "X-tiny", "deformable"),
    ("groups", "R-tiny-bottleneck", "wrong --arch"),
    ("depth", "R-tiny", "wrong --arch"),
])
def test_bad_checkpoints_refused_with_one_line(tmp_path, capsys, case, arch, message):
    sd = make_d2_state(**SPECS["X-tiny"])
    if case == "deformable":
        sd["backbone.res5.0.conv2_offset.weight"] = torch.zeros(18, 128, 3, 3)
    src = _write(sd, tmp_path / "x.pth", "pth")
    assert main([str(src), str(tmp_path / "o.safetensors"), "--arch", arch]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_key_mappings_are_pure_and_report_leftovers():
    t = torch.zeros(1)
    d2, unmatched = detectron2_to_backbone({
        "backbone.stem.conv1.weight": t,
        "backbone.stem.conv1.norm.running_var": t,
        "backbone.res2.0.shortcut.norm.bias": t,
        "backbone.res4.3.conv2.norm.running_mean": t,
        "backbone.res4.3.conv2.norm.num_batches_tracked": t,
        "backbone.bottom_up.res3.1.conv3.weight": t,
        "roi_heads.res5.2.conv1.weight": t,  # C4 detectors keep res5 in the RoI head
        "res3.1.conv3.weight": t,  # duplicate of the FPN-wrapped key above
        "roi_heads.box_predictor.cls_score.weight": t,
    })
    assert set(d2) == {"body.conv1.weight", "body.bn1.running_var", "body.layer1.0.downsample.1.bias",
                       "body.layer3.3.bn2.running_mean", "body.layer2.1.conv3.weight",
                       "body.layer4.2.conv1.weight"}
    assert unmatched == ["res3.1.conv3.weight", "roi_heads.box_predictor.cls_score.weight"]
    tv, unmatched = torchvision_to_backbone({"module.layer1.0.downsample.0.weight": t, "bn1.weight": t,
                                             "bn1.num_batches_tracked": t, "fc.weight": t})
    assert set(tv) == {"body.layer1.0.downsample.0.weight", "body.bn1.weight"} and unmatched == ["fc.weight"]


def test_detector_heads_written_when_mapping_exists(tmp_path, capsys):
    sd = make_d2_state(**SPECS["X-tiny"])
    src = _write(sd, tmp_path / "d.pth", "pth")
    dst = tmp_path / "bb.safetensors"
    assert main([str(src), str(dst), "--arch", "X-tiny"]) == 0
    out = capsys.readouterr().out
    try:
        from gridvqa.models.detector import detectron2_heads_to_detector  # noqa: F401
    except ImportError:
        assert "backbone only" in out
    else:
        assert "backbone only" not in out


def test_cli_module_runs(tmp_path):
    src = _write(make_d2_state(**SPECS["X-tiny"]), tmp_path / "d.pth", "pth")
    dst = tmp_path / "bb.safetensors"
    cmd = [sys.executable, "-m", "gridvqa.models.convert", str(src), str(dst), "--arch", "X-tiny"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert dst.is_file()


# --- safe loading -------------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["pkl", "pth"])
def test_pickle_that_runs_code_is_refused(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"evil.{fmt}"
    payload = {"model": {"w": _RunsCode(marker)}}
    if fmt == "pth":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafePickleError, match=rf"evil\.{fmt}.*system"):
        load_state_dict_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_load_as_tensors(tmp_path, protocol):
    import numpy as np

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5), "c": np.arange(3)}
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "x", "matching_heuristics": True},
                                  protocol=protocol))
    sd = load_state_dict_file(path)
    assert set(sd) == {"a", "b", "c"}
    torch.testing.assert_close(sd["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert sd["b"].item() == 2.5 and sd["c"].dtype == torch.int64


def test_load_state_dict_file_wrappers_and_bad_files(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    assert list(load_state_dict_file(path)) == ["w"]
    with pytest.raises(DataError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"hello world, not a pickle")
    with pytest.raises(DataError, match=r"junk\.pkl"):
        load_state_dict_file(junk)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 3)
    with pytest.raises(DataError, match=r"bad\.safetensors"):
        load_state_dict_file(bad_st)
    notdict = tmp_path / "list.pth"
    torch.save([torch.ones(1)], notdict)
    with pytest.raises(DataError, match="expected a state dict"):
        load_state_dict_file(notdict)
