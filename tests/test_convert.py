"""Checkpoint conversion and safe loading.

The key test builds a detectron2-named state dict, converts it, and checks our backbone against an
independent functional re-implementation of detectron2's ResNet (BottleneckBlock, FrozenBN,
stride_in_1x1, res5 dilation) in tests/d2_reference.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open

from d2_reference import SPECS, d2_reference, make_d2_state
from gridvqa.errors import ConfigError, DataError
from gridvqa.models.backbone import build_backbone
from gridvqa.models.convert import detectron2_to_backbone, main, torchvision_to_backbone
from gridvqa.models.safe_load import UnsafePickleError, load_state_dict_file


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


# --- pixel normalisation travels with the weights ------------------------------------------------------

X101_STD = [57.375, 57.120, 58.395]  # grid-feats-vqa configs/X-101-grid.yaml PIXEL_STD
D2_MEAN = [103.530, 116.280, 123.675]


def _pixel_norm(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["pixel_norm"])


def _converted_x_tiny(tmp_path: Path) -> Path:
    src = _write(make_d2_state(**SPECS["X-tiny"]), tmp_path / "x.pth", "pth")
    dst = tmp_path / "x_tiny.safetensors"
    assert main([str(src), str(dst), "--arch", "X-tiny"]) == 0
    return dst


def test_converter_records_the_sources_pixel_normalisation(tmp_path, capsys):
    x = _converted_x_tiny(tmp_path)
    assert "pixel_norm=detectron2_x101" in capsys.readouterr().out
    assert _pixel_norm(x) == {"kind": "detectron2", "mean": D2_MEAN, "std": X101_STD}
    r = _write(make_d2_state(**SPECS["R-tiny-bottleneck"]), tmp_path / "r.pth", "pth")
    assert main([str(r), str(tmp_path / "r.safetensors"), "--arch", "R-tiny-bottleneck"]) == 0
    assert _pixel_norm(tmp_path / "r.safetensors") == {"kind": "detectron2", "mean": D2_MEAN,
                                                       "std": [1.0, 1.0, 1.0]}  # MSRA: std in conv1
    # torchvision / timm ImageNet weights: RGB 0-1, ImageNet mean and std
    tv = {k.removeprefix("body."): v for k, v in build_backbone("R-tiny-bottleneck").state_dict().items()}
    torch.save(tv, tmp_path / "tv.pth")
    assert main([str(tmp_path / "tv.pth"), str(tmp_path / "tv.safetensors"),
                 "--arch", "R-tiny-bottleneck"]) == 0
    assert _pixel_norm(tmp_path / "tv.safetensors") == {"kind": "imagenet", "mean": [0.485, 0.456, 0.406],
                                                        "std": [0.229, 0.224, 0.225]}
    # a source trained otherwise: said on the command line
    assert main([str(r), str(tmp_path / "r2.safetensors"), "--arch", "R-tiny-bottleneck",
                 "--pixel-norm", "detectron2_x101"]) == 0
    assert _pixel_norm(tmp_path / "r2.safetensors")["std"] == X101_STD


def test_vqa_data_and_model_take_the_recorded_normalisation_and_refuse_a_contradiction(tiny_shapes, tmp_path):
    import hydra

    from gridvqa.errors import find_user_error
    from hydra_utils import compose_cfg

    weights = _converted_x_tiny(tmp_path)
    base = ["experiment=e2e", "backbone.name=X-tiny", f"backbone.weights={weights}",
            "data.image_size=[64,64]"]
    cfg = compose_cfg(base, tiny_shapes, tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    pipe = dm.dataset("val").pipeline
    assert list(pipe.normalization.std) == X101_STD and pipe.normalization.bgr
    model = hydra.utils.instantiate(cfg.model)
    assert model.hparams.image["std"] == X101_STD and model.hparams.image["norm"] == "detectron2"
    from gridvqa.inference import image_pipeline

    assert list(image_pipeline(model).normalization.std) == X101_STD  # what evaluate / predict use

    cfg = compose_cfg([*base, "data.pixel_std=[1,1,1]"], tiny_shapes, tmp_path)
    with pytest.raises(Exception) as e:
        hydra.utils.instantiate(cfg.data)
    msg = str(find_user_error(e.value))
    assert "\n" not in msg and "data.pixel_std=[1.0, 1.0, 1.0]" in msg and str(weights) in msg
    assert "57.375" in msg
    with pytest.raises(Exception) as e:
        hydra.utils.instantiate(compose_cfg(base, tiny_shapes, tmp_path).model,
                                image={"size": [64, 64], "norm": "imagenet"})
    assert re.match(r"model\.image\.norm=imagenet contradicts .*x_tiny\.safetensors, whose weights were "
                    r"trained with pixel norm detectron2 \(leave model\.image\.norm null",
                    str(find_user_error(e.value)))


def test_vg_pretraining_from_converted_weights_uses_and_records_their_normalisation(tiny_shapes, tmp_path):
    import pytorch_lightning as pl

    from gridvqa.data.detection_data import VGDataModule
    from gridvqa.lit.detection_module import DetectionModule

    weights = _converted_x_tiny(tmp_path)
    dm = VGDataModule(str(tiny_shapes), train_short=64, test_short=64, max_size=96, batch_size=2,
                      num_workers=0, max_val_images=2, weights=str(weights))
    assert list(dm.normalization.std) == X101_STD
    torch.manual_seed(0)
    module = DetectionModule(
        "grid", dict(name="X-tiny", norm="FrozenBN", freeze_at=2, res5_dilation=2, weights=str(weights)),
        dict(anchor_sizes=[16, 32, 64], fc_dim=32, batch_size_per_image=16),
        num_classes=dm.num_classes, num_attributes=dm.num_attributes, export_dir=str(tmp_path / "export"),
    )
    pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module, datamodule=dm)
    for name in ("backbone.safetensors", "detector.safetensors"):
        assert _pixel_norm(tmp_path / "export" / name)["std"] == X101_STD
    with pytest.raises(ConfigError, match=r"^data\.pixel_std=\[1\.0, 1\.0, 1\.0\] contradicts .*x_tiny"):
        VGDataModule(str(tiny_shapes), pixel_std=[1, 1, 1], weights=str(weights))
