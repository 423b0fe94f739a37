"""The grid backbone: shapes from feature_info, detectron2 dilation / stride placement, freezing, weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from timm.models.resnet import ResNet
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from gridvqa.errors import ConfigError
from gridvqa.models.backbone import ARCHS, STAGE_NAMES, ResNetBackbone, ShapeSpec, build_backbone


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine terms, so FrozenBN / stride / dilation changes show in outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def _image(h: int = 64, w: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _tiny(**kw) -> ResNetBackbone:
    torch.manual_seed(0)
    m = build_backbone(kw.pop("name", "X-tiny"), **kw)
    _randomise_norms(m)
    return m.eval()


def test_registry_builds_and_unknown_names_fail():
    assert {"R-50", "X-101-32x8d", "X-152-32x8d", "R-18", "R-tiny"} <= set(ARCHS)
    assert ARCHS["X-152-32x8d"]["layers"] == (3, 8, 36, 3)
    assert (ARCHS["X-152-32x8d"]["cardinality"], ARCHS["X-152-32x8d"]["base_width"]) == (32, 8)
    with pytest.raises(ConfigError, match="R-51"):
        build_backbone("R-51")
    with pytest.raises(ConfigError, match="SyncBN"):
        build_backbone("R-tiny", norm="SyncBN")
    with pytest.raises(ConfigError, match="res6"):
        build_backbone("R-tiny", out_features=("res6",))


@pytest.mark.parametrize("name,channels", [
    ("R-50", (256, 512, 1024, 2048)),
    ("R-18", (64, 128, 256, 512)),
    ("R-tiny", (32, 64, 128, 256)),
    ("X-tiny", (64, 128, 256, 512)),
])
def test_output_shape_from_feature_info_matches_forward(name, channels):
    m = build_backbone(name, out_features=STAGE_NAMES).eval()
    info = {d["module"]: d for d in m.body.feature_info}
    shapes = m.output_shape()
    assert [shapes[s].channels for s in STAGE_NAMES] == list(channels)
    assert [shapes[s].channels for s in STAGE_NAMES] == [info[f"layer{i}"]["num_chs"] for i in range(1, 5)]
    assert [shapes[s].stride for s in STAGE_NAMES] == [4, 8, 16, 32]
    x = _image(64, 96)
    with torch.no_grad():
        out = m(x)
    for s in STAGE_NAMES:
        assert out[s].shape == (2, shapes[s].channels, 64 // shapes[s].stride, 96 // shapes[s].stride)
    m.set_res5_dilation(2)
    assert m.output_shape()["res5"] == ShapeSpec(channels[3], 16)
    with torch.no_grad():
        assert m(x)["res5"].shape[-2:] == (4, 6)


def test_head_dropped_and_unused_stages_not_run():
    m = _tiny(out_features=("res3",))
    assert not any(n.startswith("body.fc") for n, _ in m.named_parameters())
    ran = []
    m.body.layer3.register_forward_hook(lambda *a: ran.append("res4"))
    m.body.layer4.register_forward_hook(lambda *a: ran.append("res5"))
    with torch.no_grad():
        out = m(_image())
    assert list(out) == ["res3"] and ran == []


@torch.no_grad()
def test_forward_until_and_res5_compose_to_forward():
    m = _tiny(out_features=("res4", "res5"), res5_dilation=2)
    x = _image()
    out = m(x)
    res4 = m.forward_until(x, "res4")
    torch.testing.assert_close(res4, out["res4"])
    torch.testing.assert_close(m.res5(res4), out["res5"])
    assert m.res5 is m.body.layer4
    with pytest.raises(ConfigError):
        m.forward_until(x, "res7")


@pytest.mark.parametrize("name", ["X-tiny", "R-tiny"])
def test_res5_dilation_dilates_every_block_and_switches_on_same_weights(name):
    m = _tiny(name=name, out_features=("res4", "res5"), res5_dilation=2)
    x = _image()
    with torch.no_grad():
        dil = m(x)
    assert dil["res5"].shape[-2:] == dil["res4"].shape[-2:]  # output stride 16
    for block in m.res5:
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
    first = m.res5[0]
    strided = [c for c in (first.conv1, first.conv2, first.downsample[0]) if c.stride != (1, 1)]
    assert strided == []
    m.set_res5_dilation(1)
    with torch.no_grad():
        und = m(x)
    assert und["res5"].shape[-2:] == (2, 3)  # output stride 32
    torch.testing.assert_close(und["res4"], dil["res4"])
    for block in m.res5:
        assert block.conv2.dilation == (1, 1)
    m.set_res5_dilation(2)
    with torch.no_grad():
        torch.testing.assert_close(m(x)["res5"], dil["res5"])
    with pytest.raises(ConfigError):
        m.set_res5_dilation(3)


@torch.no_grad()
def test_timm_output_stride_16_is_not_detectron2_dilation():
    ours = _tiny(res5_dilation=2, norm="BN", freeze_at=0)
    timm_os16 = ResNet(**ARCHS["X-tiny"], output_stride=16, num_classes=0, global_pool="")
    timm_os16.load_state_dict(ours.body.state_dict())
    timm_os16.eval()
    assert timm_os16.layer4[0].conv2.dilation == (1, 1)  # timm: first res5 block not dilated
    x = _image()
    ref = timm_os16.forward_features(x)
    got = ours(x)["res5"]
    assert ref.shape == got.shape
    assert not torch.allclose(ref, got, atol=1e-3)


@torch.no_grad()
def test_stride_placement():
    x = _image()
    outs = {}
    for in_1x1 in (False, True):
        m = _tiny(stride_in_1x1=in_1x1, out_features=("res5",))
        for s in ("res3", "res4", "res5"):
            first = m.stage(s)[0]
            assert first.conv1.stride == ((2, 2) if in_1x1 else (1, 1))
            assert first.conv2.stride == ((1, 1) if in_1x1 else (2, 2))
            assert first.downsample[0].stride == (2, 2)
        assert m.stage("res2")[0].conv1.stride == (1, 1) and m.stage("res2")[0].conv2.stride == (1, 1)
        outs[in_1x1] = m(x)["res5"]
        m.set_res5_dilation(2)
        assert m.res5[0].conv1.stride == (1, 1) and m.res5[0].conv2.stride == (1, 1)
        m.set_res5_dilation(1)
        assert m.res5[0].conv1.stride == ((2, 2) if in_1x1 else (1, 1))
    assert outs[False].shape == outs[True].shape
    assert not torch.allclose(outs[False], outs[True], atol=1e-3)


def test_freeze_at_flags_and_frozen_statistics_survive_a_training_step():
    m = build_backbone("X-tiny", norm="BN", freeze_at=2, out_features=("res5",))
    for n, p in m.named_parameters():
        frozen = n.startswith(("body.conv1", "body.bn1", "body.layer1."))
        assert p.requires_grad is not frozen, n
    assert isinstance(m.body.bn1, FrozenBatchNorm2d) and isinstance(m.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(m.body.layer2[0].bn1, nn.BatchNorm2d)
    with torch.no_grad():
        _randomise_norms(m)  # timm zero-inits each block's last BN weight, which would block gradients
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    m(_image())["res5"].square().mean().backward()
    opt.step()
    after = m.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("body.conv1", "body.bn1", "body.layer1.")):
            assert same, f"frozen {k} changed"
    assert not torch.equal(before["body.layer2.0.conv1.weight"], after["body.layer2.0.conv1.weight"])
    assert not torch.equal(before["body.layer2.0.bn1.running_mean"], after["body.layer2.0.bn1.running_mean"])


def test_freezebn_default_keeps_all_statistics_and_freeze_at_zero_trains_everything():
    m = build_backbone("R-tiny", freeze_at=0)
    assert all(p.requires_grad for p in m.parameters())
    m = _tiny(name="R-tiny", freeze_at=5)
    assert not any(p.requires_grad for p in m.parameters())
    m = _tiny(name="R-tiny")
    bufs = {k: v.clone() for k, v in m.named_buffers()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    m(_image())["res5"].mean().backward()
    opt.step()
    for k, v in m.named_buffers():
        assert torch.equal(bufs[k], v), k
    with pytest.raises(ConfigError):
        build_backbone("R-tiny", freeze_at=6)


def test_group_norm_builds_and_trains():
    m = build_backbone("X-tiny", norm="GN", freeze_at=0)
    assert any(isinstance(x, nn.GroupNorm) for x in m.modules())
    m(_image())["res5"].mean().backward()
    assert m.body.layer4[0].bn1.weight.grad is not None


def _outputs_and_grads(m: ResNetBackbone, x: torch.Tensor):
    m.train()
    m.zero_grad()
    out = m(x)["res5"]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("option", ["grad_checkpointing", "channels_last"])
def test_checkpointing_and_channels_last_change_nothing(option):
    x = _image()
    plain = _tiny(freeze_at=1)
    other = _tiny(freeze_at=1, **{option: True})
    assert getattr(other, option)
    if option == "channels_last":
        assert other.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    out_a, grads_a = _outputs_and_grads(plain, x)
    out_b, grads_b = _outputs_and_grads(other, x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "name, norm, channels_last",
    [("R-tiny", "FrozenBN", False), ("X-tiny", "BN", True), ("R-tiny-bottleneck", "GN", False)],
)
def test_fold_batch_norm_keeps_features_and_leaves_no_bn(name, norm, channels_last):
    x = _image()
    m = _tiny(name=name, norm=norm, freeze_at=2, channels_last=channels_last)  # BN: stem + res2 FrozenBN
    with torch.no_grad():
        before = m(x)["res5"]
    bns = [n for n, b in m.named_modules() if isinstance(b, (FrozenBatchNorm2d, nn.BatchNorm2d))]
    gns = [n for n, b in m.named_modules() if isinstance(b, nn.GroupNorm)]
    assert m.fold_batch_norm() == len(bns)
    assert not any(isinstance(b, (FrozenBatchNorm2d, nn.BatchNorm2d)) for b in m.modules())
    # GN's statistics are per image: it stays
    assert [n for n, b in m.named_modules() if isinstance(b, nn.GroupNorm)] == gns
    assert (len(gns) > 0) == (norm == "GN") != (len(bns) > 0)
    if channels_last:
        assert m.body.layer1[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        after = m(x)["res5"]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert m.fold_batch_norm() == 0  # nothing left to fold


def test_fold_batch_norm_refuses_a_training_model():
    m = build_backbone("R-tiny", freeze_at=0).train()
    with pytest.raises(ValueError, match="training mode"):
        m.fold_batch_norm()


def test_weights_round_trip_and_errors(tmp_path):
    src = _tiny(stride_in_1x1=True)
    path = tmp_path / "bb.safetensors"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(path), metadata={"gridvqa": json.dumps({"stride_in_1x1": True})})
    x = _image()
    loaded = build_backbone("X-tiny", stride_in_1x1=True, weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["res5"], src(x)["res5"])

    with pytest.raises(ConfigError, match="stride_in_1x1"):
        build_backbone("X-tiny", stride_in_1x1=False, weights=path)

    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if "layer4" not in k}, str(partial))
    with pytest.raises(ConfigError, match=r"partial\.safetensors: \d+ backbone weights missing"):
        build_backbone("X-tiny", weights=partial)
    missing, _ = build_backbone("X-tiny", weights=partial, strict=False).load_weights(partial, strict=False)
    assert missing and all("layer4" in k for k in missing)

    with pytest.raises(ConfigError, match="wrong shape"):
        build_backbone("R-tiny-bottleneck", weights=path, stride_in_1x1=True)


def test_weights_accept_detector_prefix_and_report_unexpected(tmp_path, caplog):
    src = _tiny()
    x = _image()
    with torch.no_grad():
        ref = src(x)["res5"]
    det = tmp_path / "det.safetensors"
    sd = {f"backbone.{k}": v.contiguous() for k, v in src.state_dict().items()}
    save_file({**sd, "roi_heads.fc1.weight": torch.zeros(2, 2)}, str(det))
    with torch.no_grad():
        torch.testing.assert_close(build_backbone("X-tiny", weights=det).eval()(x)["res5"], ref)

    extra = tmp_path / "extra.safetensors"
    save_file({**{k: v.contiguous() for k, v in src.state_dict().items()}, "body.fc.weight": torch.zeros(2)},
              str(extra))
    with caplog.at_level("WARNING"):
        _, unexpected = build_backbone("X-tiny").load_weights(extra)
    assert unexpected == ["body.fc.weight"] and "body.fc.weight" in caplog.text
