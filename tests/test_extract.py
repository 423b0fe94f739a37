"""Feature extraction to HDF5: resume after SIGKILL, broken images, refusals, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from PIL import Image

from gridvqa.config import REPO_ROOT, compose_config
from gridvqa.data import layout
from gridvqa.data.features import open_features
from gridvqa.data.images import ImagePipeline, ResizeFixed, ResizeShortest, collate_images, load_image
from gridvqa.errors import ConfigError, DataError
from gridvqa.extraction import (
    ImageItem,
    file_sha256,
    folder_images,
    plan_batches,
    run,
    skipped_path,
    split_images,
)
from gridvqa.models.backbone import build_backbone

NUM_CLASSES, NUM_ATTRIBUTES = 5, 4
TINY_DETECTOR = dict(anchor_sizes=[16, 32, 64], fc_dim=64, rpn_pre_nms_top_n_test=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from gridvqa.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, train_images=6, val_images=4, test_images=2, seed=5)
    return root


def _perturb_bn(module: torch.nn.Module, seed: int) -> None:
    """Random BN statistics, so a load that silently failed would show (fresh BN is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """What `python -m gridvqa.train experiment=pretrain_vg[_c4]` exports, from the real exporter (R-tiny)."""
    from gridvqa.lit.detection_module import DetectionModule, export_weights

    art = tmp_path_factory.mktemp("artifacts")
    for kind, task, dilation, outs in (
        ("grid", "pretrain_vg", 2, ["res5"]),
        ("c4", "pretrain_vg_c4", 1, ["res4"]),
    ):
        torch.manual_seed(1)
        bb = dict(name="R-tiny", norm="BN", freeze_at=0, res5_dilation=dilation, out_features=outs)
        module = DetectionModule(kind, bb, TINY_DETECTOR, NUM_CLASSES, NUM_ATTRIBUTES)
        _perturb_bn(module, seed=2)
        export_weights(module, art / task)
    return art


def make_cfg(data: Path, out: Path, artifacts: Path | None = None, *overrides: str):
    # stride 32 (the paper) unless a test asks for res5_dilation=2
    base = [f"paths.data_root={data}", f"output={out}", "num_workers=0", "progress=false", "batch_size=2",
            "res5_dilation=1"]
    if artifacts is not None:
        base.append(f"paths.artifacts_dir={artifacts}")
    cfg = compose_config("extract", [*base, "region.proposals=100", *overrides])
    with open_dict(cfg):
        cfg.region.detector = {"anchor_sizes": [16, 32, 64]}
    return cfg


def direct_grid(backbone, path: Path, resize, stride: int = 32) -> np.ndarray:
    """res5 of one image alone (padded to a multiple of 32 only), valid cells, [H, W, C]."""
    x, _, info = ImagePipeline(resize)(load_image(path))
    batch, _, _ = collate_images([x])
    with torch.inference_mode():
        f = backbone(batch)["res5"][0]
    h, w = info["size"]
    return f[:, : math.ceil(h / stride), : math.ceil(w / stride)].permute(1, 2, 0).numpy()


def read_all(path: Path) -> dict[int, dict]:
    with open_features(path) as r:
        return {i: r.get(i) for i in r.image_ids}


@pytest.mark.parametrize("dilation", [1, 2])
def test_grid_stored_shapes_and_values_match_a_direct_backbone_forward(data, artifacts, tmp_path, dilation):
    out = tmp_path / "grid.h5"
    stride = 32 // dilation
    s = run(
        make_cfg(
            data,
            out,
            artifacts,
            "kind=grid",
            "image_size=null",
            "short=64",
            "max_size=100",
            "batch_size=4",
            "dtype=float32",
            f"res5_dilation={dilation}",
        )
    )
    assert (s.done_now, s.skipped, s.nothing_to_do) == (4, [], False)
    weights = artifacts / "pretrain_vg" / "backbone.safetensors"
    # the exported backbone ran dilated (stride 16); res5_dilation=1 must undo that on the same weights
    backbone = build_backbone("R-tiny", norm="BN", weights=weights, res5_dilation=dilation).eval()
    resize = ResizeShortest(64, 100)
    with open_features(out) as r:
        assert r.provenance["checkpoint"] == file_sha256(weights)
        assert r.provenance["output_stride"] == stride and r.dtype == "float32"
        assert sorted(r.image_ids) == [7, 8, 9, 10]
        for item in split_images(data, "val"):
            got = r.get(item.image_id)
            h0, w0 = load_image(item.path).size[::-1]
            assert tuple(got["image_size"]) == (h0, w0)
            nh, nw = resize.output_size(h0, w0)
            assert got["grid"].shape == (math.ceil(nh / stride), math.ceil(nw / stride), 256)
            want = direct_grid(backbone, item.path, resize, stride)
            # a batch of 4 vs one image: float32 sums in another order, noise relative to the map's scale
            np.testing.assert_allclose(got["grid"], want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_grid_from_a_bare_backbone_file_fixed_size_float16(data, tmp_path):
    torch.manual_seed(3)
    bb = build_backbone("R-tiny", norm="BN", freeze_at=0)
    _perturb_bn(bb, seed=4)
    from gridvqa.models.weights import save_safetensors

    weights = save_safetensors(bb.state_dict(), tmp_path / "r_tiny.safetensors")
    out = tmp_path / "g.h5"
    s = run(
        make_cfg(data, out, None, "kind=grid", f"weights={weights}", "image_size=[64,96]", "batch_size=3")
    )
    assert s.done_now == 4
    bb.eval()
    with open_features(out) as r:
        assert r.dtype == "float16" and r.provenance["resize"] == "fixed 64x96"
        item = split_images(data, "val")[2]
        grid = r.get(item.image_id)["grid"]
        assert grid.dtype == np.float16 and grid.shape == (2, 3, 256)
        want = direct_grid(bb, item.path, ResizeFixed(64, 96))
        np.testing.assert_allclose(grid.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_region_boxes_in_original_pixels_with_predictions(data, artifacts, tmp_path):
    out = tmp_path / "region.h5"
    cfg = make_cfg(
        data,
        out,
        artifacts,
        "kind=region",
        "image_size=null",
        "short=96",
        "max_size=160",
        "region.min_boxes=3",
        "region.max_boxes=3",
        "dtype=float32",
        "batch_size=1",
    )
    s = run(cfg)
    assert s.done_now == 4
    from gridvqa.models.detector import build_detector
    from gridvqa.models.safe_load import load_state_dict_file

    exported = json.loads((artifacts / "pretrain_vg_c4" / "config.json").read_text())
    bb = build_backbone(**{**exported["backbone"], "freeze_at": 0})
    det = build_detector(
        "c4",
        bb,
        NUM_CLASSES,
        NUM_ATTRIBUTES,
        **{**exported["detector"], "rpn_post_nms_top_n_test": 100, "min_boxes": 3, "max_boxes": 3},
    )
    det.load_state_dict(load_state_dict_file(artifacts / "pretrain_vg_c4" / "detector.safetensors"))
    det.eval()
    item = split_images(data, "val")[1]
    with open_features(out) as r:
        assert r.has_attributes and r.feature_dim == 256
        assert r.provenance["proposals"] == 100 and r.provenance["detector"] == "C4Detector"
        got = r.get(item.image_id)
        for i in r.image_ids:
            e = r.get(i)
            h, w = e["image_size"]
            assert e["features"].shape == (3, 256) and e["boxes"].shape == (3, 4)
            assert (e["boxes"] >= 0).all() and (e["boxes"][:, 2] <= w).all() and (e["boxes"][:, 3] <= h).all()
            assert ((0 <= e["labels"]) & (e["labels"] < NUM_CLASSES)).all()
            assert ((0 <= e["attr_labels"]) & (e["attr_labels"] < NUM_ATTRIBUTES)).all()
            assert ((0 < e["attr_scores"]) & (e["attr_scores"] <= 1)).all()
    x, _, info = ImagePipeline(ResizeShortest(96, 160))(load_image(item.path))
    batch, _, sizes = collate_images([x])
    with torch.inference_mode():
        d = det(batch, sizes.tolist())[0]
    sy, sx = info["scale"]
    assert info["size"] != info["orig_size"]  # the resize is undone below, not skipped
    np.testing.assert_allclose(
        got["boxes"], (d["boxes"] / torch.tensor([sx, sy, sx, sy])).numpy(), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(got["features"], d["features"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["labels"], (d["labels"] - 1).numpy())
    np.testing.assert_array_equal(got["attr_labels"], d["attr_scores"].argmax(1).numpy())


KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    from omegaconf import OmegaConf
    from gridvqa import extraction
    calls = 0
    real = extraction._run_batch
    def dying(*args, **kwargs):
        global calls
        calls += 1
        if calls == 3:  # two batches of 2 handed over (one commit of 2 images), a third about to run
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    extraction._run_batch = dying
    extraction.run(OmegaConf.load(sys.argv[1]))
""")


@pytest.mark.parametrize("writer_thread", [False, True])
def test_resume_after_sigkill_gives_the_same_file_as_one_run(data, artifacts, tmp_path, writer_thread):
    # shortest-side resize: images of several sizes, batched by padded shape
    common = (
        f"writer_thread={str(writer_thread).lower()}",
        "kind=grid",
        "image_size=null",
        "short=64",
        "max_size=100",
        "batch_size=2",
        "split=train",
        "commit_images=2",
    )
    whole = tmp_path / "whole.h5"
    assert run(make_cfg(data, whole, artifacts, *common, "num_workers=2")).done_now == 6

    out = tmp_path / "resumed.h5"
    cfg = make_cfg(data, out, artifacts, *common)
    from omegaconf import OmegaConf

    with open_dict(cfg):
        del cfg.paths["output_dir"]  # a Hydra runtime value; the child runs without Hydra
    (tmp_path / "cfg.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    child = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, str(tmp_path / "cfg.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr
    with open_features(out) as r:
        first = len(r)
    # the caller's thread commits before the third batch; the writer thread may not have committed yet
    assert (0 if writer_thread else 2) <= first < 6
    s = run(cfg)
    assert (s.done_before, s.done_now) == (first, 6 - first)
    a, b = read_all(whole), read_all(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for i in a:
        np.testing.assert_array_equal(a[i]["grid"], b[i]["grid"])
    s = run(cfg)
    assert s.nothing_to_do and "nothing to do" in s.line()


def test_max_images_then_continue(data, artifacts, tmp_path):
    out = tmp_path / "g.h5"
    s = run(
        make_cfg(data, out, artifacts, "kind=region", "max_images=1", "batch_size=1", "image_size=[64,64]")
    )
    assert (s.done_now, s.remaining) == (1, 3) and "left" in s.line()
    s = run(make_cfg(data, out, artifacts, "kind=region", "batch_size=1", "image_size=[64,64]"))
    assert (s.done_before, s.done_now, s.remaining) == (1, 3, 0)


def test_broken_images_are_skipped_listed_and_retried_once_fixed(data, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted(layout.images_dir(data, "val").glob("*.jpg"))
    for k, name in enumerate(["cat.jpg", "dog.jpg", "sub/emu.jpg"]):
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copy(good[k], folder / name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    data_bytes = good[3].read_bytes()
    (folder / "half.jpg").write_bytes(data_bytes[: len(data_bytes) // 2])
    out = tmp_path / "feats.h5"
    args = ("kind=grid", "weights=random", f"images_dir={folder}", "image_size=[64,64]")
    s = run(make_cfg(data, out, None, *args))
    assert s.done_now == 3
    assert sorted(Path(p).name for p, _ in s.skipped) == ["empty.jpg", "half.jpg", "text.png"]
    reasons = dict((Path(p).name, r) for p, r in s.skipped)
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["half.jpg"]
    listed = json.loads(skipped_path(out).read_text())["skipped"]
    assert sorted(Path(e["path"]).name for e in listed) == ["empty.jpg", "half.jpg", "text.png"]
    ids = json.loads((tmp_path / "feats.h5.ids.json").read_text())  # names without ids: a running index
    assert sorted(ids) == ["cat.jpg", "dog.jpg", "empty.jpg", "half.jpg", "sub/emu.jpg", "text.png"]
    with open_features(out) as r:
        assert sorted(r.image_ids) == sorted(ids[n] for n in ("cat.jpg", "dog.jpg", "sub/emu.jpg"))

    s = run(make_cfg(data, out, None, *args))  # nothing changed: nothing to retry
    assert s.nothing_to_do and "unreadable" in s.line()

    (folder / "half.jpg").write_bytes(data_bytes)  # fixed: picked up, the others still listed
    s = run(make_cfg(data, out, None, *args))
    assert (s.done_now, len(s.skipped)) == (1, 2)
    listed = json.loads(skipped_path(out).read_text())["skipped"]
    assert sorted(Path(e["path"]).name for e in listed) == ["empty.jpg", "text.png"]
    with open_features(out) as r:
        assert ids["half.jpg"] in r


def test_folder_ids_from_coco_names_or_a_stable_map(tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    for i in (42, 7):
        (coco / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"x")
    (coco / "notes.txt").write_text("ignored")
    assert [(it.image_id, it.path.name) for it in folder_images(coco, tmp_path / "m1.json")] == [
        (7, "COCO_val2014_000000000007.jpg"),
        (42, "COCO_val2014_000000000042.jpg"),
    ]
    assert not (tmp_path / "m1.json").exists()

    named = tmp_path / "named"
    named.mkdir()
    for n in ("b.jpg", "c.png"):
        (named / n).write_bytes(b"x")
    first = {it.path.name: it.image_id for it in folder_images(named, tmp_path / "m2.json")}
    assert first == {"b.jpg": 0, "c.png": 1}
    (named / "a.jpg").write_bytes(b"x")  # sorts first, but the earlier files keep their ids
    second = {it.path.name: it.image_id for it in folder_images(named, tmp_path / "m2.json")}
    assert second == {"a.jpg": 2, "b.jpg": 0, "c.png": 1}
    (coco / "cat.jpg").write_bytes(b"x")  # one name without an id: a map, the COCO ids kept
    mixed = {it.path.name: it.image_id for it in folder_images(coco, tmp_path / "m4.json")}
    assert mixed == {"COCO_val2014_000000000007.jpg": 7, "COCO_val2014_000000000042.jpg": 42, "cat.jpg": 43}
    assert json.loads((tmp_path / "m4.json").read_text())["cat.jpg"] == 43

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        folder_images(tmp_path / "empty", tmp_path / "m3.json")
    with pytest.raises(DataError, match="image folder not found"):
        folder_images(tmp_path / "nowhere", tmp_path / "m3.json")


def test_batches_hold_one_padded_shape_and_cover_every_image(data):
    items = split_images(data, "train")
    resize = ResizeShortest(64, 100)
    plan = plan_batches(items, resize, 2)
    assert sorted(i for b in plan for i in b) == list(range(6)) and plan == plan_batches(items, resize, 2)
    for b in plan:
        shapes = set()
        for i in b:
            h, w = resize.output_size(*load_image(items[i].path).size[::-1])
            shapes.add((math.ceil(h / 32), math.ceil(w / 32)))
        assert len(shapes) == 1
    assert plan_batches(items, ResizeFixed(64, 64), 4) == [[0, 1, 2, 3], [4, 5]]
    broken = [*items, ImageItem(99, data / "missing.jpg")]
    assert plan_batches(broken, resize, 2)[-1] == [6]  # unreadable headers: a batch of their own, last
    with pytest.raises(ConfigError, match="batch_size"):
        plan_batches(items, resize, 0)


def test_different_settings_are_refused_unless_overwrite(data, tmp_path):
    out = tmp_path / "g.h5"
    args = ("kind=grid", "weights=random", "image_size=[64,64]")
    run(make_cfg(data, out, None, *args))
    with pytest.raises(DataError) as err:
        run(make_cfg(data, out, None, *args, "dtype=float32", "seed=1"))
    msg = str(err.value)
    assert str(out) in msg and "dtype" in msg and "checkpoint" in msg and "overwrite=true" in msg
    assert "\n" not in msg
    s = run(make_cfg(data, out, None, *args, "dtype=float32", "seed=1", "overwrite=true"))
    assert s.done_now == 4
    with open_features(out) as r:
        assert r.dtype == "float32" and r.provenance["checkpoint"] == "random(seed=1)"


def test_missing_weights_name_the_command_that_makes_them(data, tmp_path):
    for kind, task in (("grid", "pretrain_vg"), ("region", "pretrain_vg_c4")):
        with pytest.raises(ConfigError, match=f"python -m gridvqa.train experiment={task}`"):
            run(make_cfg(data, tmp_path / "x.h5", tmp_path / "nothing", f"kind={kind}"))
    assert not (tmp_path / "x.h5").exists()


def test_cli_one_line_error_and_nothing_to_do(data, tmp_path):
    out = tmp_path / "g.h5"
    args = [
        f"paths.data_root={data}",
        f"output={out}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "progress=false",
        "image_size=[64,64]",
        "num_workers=0",
        "res5_dilation=1",
    ]
    run(make_cfg(data, out, None, "kind=grid", "weights=random", "image_size=[64,64]"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    cmd = [sys.executable, "-m", "gridvqa.extract", "kind=grid"]
    done = subprocess.run(
        [*cmd, "weights=random", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "nothing to do: 4 of 4 images already extracted" in done.stdout
    bad = subprocess.run(
        [*cmd, f"paths.artifacts_dir={tmp_path}", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "experiment=pretrain_vg" in lines[0]
    with h5py.File(out, "r") as f:  # untouched by the failed run
        assert len(f["image_ids"]) == 4


# --- a converted official-layout checkpoint, extracted as the paper does -------------------------------

D2_MEAN = torch.tensor([103.530, 116.280, 123.675])  # BGR, detectron2 defaults.py PIXEL_MEAN
X101_STD_LIST = [57.375, 57.120, 58.395]  # grid-feats-vqa configs/X-101-grid.yaml PIXEL_STD
X101_STD = torch.tensor(X101_STD_LIST)


def _convert(tmp_path: Path, arch: str, residual_scale: float) -> tuple[dict, Path]:
    """A random detectron2 checkpoint of `arch` ({"model": sd}, as the official files), converted."""
    from d2_reference import SPECS, make_d2_state
    from gridvqa.models.convert import convert

    sd = make_d2_state(**SPECS[arch], seed=7, residual_scale=residual_scale)
    torch.save({"model": sd}, tmp_path / "official.pth")
    dst = tmp_path / "converted.safetensors"
    assert convert(tmp_path / "official.pth", dst, arch).pixel_norm == "detectron2_x101"
    return sd, dst


def _jpeg_600x800(folder: Path) -> Path:
    folder.mkdir()
    y, x = np.mgrid[0:600, 0:800]
    rgb = np.stack([x * 255 // 800, y * 255 // 600, (x + y) % 256], -1).astype(np.uint8)
    rgb = np.clip(rgb + np.random.default_rng(0).integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "COCO_val2014_000000000042.jpg", quality=92)
    return folder / "COCO_val2014_000000000042.jpg"


def detectron2_grid(sd: dict, arch: str, jpeg: Path, std: torch.Tensor) -> np.ndarray:
    """What grid-feats-vqa's extract_grid_feature.py computes, from detectron2's definitions: PIL decode to
    BGR 0-255, minus PIXEL_MEAN, divided by PIXEL_STD, ResizeShortestEdge(600, 1000) (a 600x800 image keeps
    its size), zero padding to a multiple of 32 (ImageList), res5 at stride 32; the cells that see pixels."""
    from d2_reference import SPECS, d2_reference

    with Image.open(jpeg) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert rgb.shape == (600, 800, 3)
    bgr = torch.from_numpy(rgb[:, :, ::-1].copy()).permute(2, 0, 1)
    x = (bgr - D2_MEAN[:, None, None]) / std[:, None, None]
    x = F.pad(x, (0, -800 % 32, 0, -600 % 32))[None]
    spec = SPECS[arch]
    res5 = d2_reference(sd, x, spec["blocks"], spec["groups"], stride_in_1x1=False, res5_dilation=1)["res5"]
    res5 = res5[0]
    return res5[:, : math.ceil(600 / 32), : math.ceil(800 / 32)].permute(1, 2, 0).numpy()


def _check_against_detectron2(stored: np.ndarray, sd: dict, arch: str, jpeg: Path) -> None:
    want = detectron2_grid(sd, arch, jpeg, X101_STD)
    assert stored.shape == want.shape == (19, 25, want.shape[-1])
    scale = float(np.abs(want).max())
    assert 0 < scale < 1e4 and np.isfinite(stored).all()
    np.testing.assert_allclose(stored, want, rtol=1e-4, atol=1e-4 * scale)
    # std 1 (the inputs 57x too large) gives other features: the check above sees the normalisation
    unscaled = detectron2_grid(sd, arch, jpeg, torch.ones(3))
    assert np.abs(stored - unscaled).max() > 0.1 * scale


def _paper_cfg(images: Path, out: Path, weights: Path, *overrides: str):
    return compose_config("extract", [
        "extract=paper", "kind=grid", f"images_dir={images}", f"output={out}", f"weights={weights}",
        "device=cpu", "num_workers=0", "progress=false", "dtype=float32", *overrides])


def test_converted_resnext_extracts_as_detectron2_with_its_recorded_std(tmp_path):
    # X-tiny: the X-101 layout (ResNeXt, stride in the 3x3, FAIR std) at a size the default suite affords
    sd, weights = _convert(tmp_path, "X-tiny", residual_scale=1.0)
    jpeg = _jpeg_600x800(tmp_path / "images")
    out = tmp_path / "grid.h5"
    cfg = _paper_cfg(jpeg.parent, out, weights, "backbone.name=X-tiny")
    assert cfg.pixel_std is None and cfg.short == 600 and cfg.max_size == 1000 and cfg.res5_dilation == 1
    summary = run(cfg)
    assert summary.done_now == 1 and not summary.skipped
    with open_features(out) as r:
        assert r.provenance["pixel_std"] == X101_STD_LIST and r.provenance["output_stride"] == 32
        assert r.provenance["resize"] == "shortest 600, max 1000"
        stored = np.asarray(r.get(42)["grid"])
    _check_against_detectron2(stored, sd, "X-tiny", jpeg)
    # a setting that contradicts what the weights record stops the run, naming both
    with pytest.raises(ConfigError) as e:
        run(_paper_cfg(jpeg.parent, tmp_path / "other.h5", weights, "backbone.name=X-tiny",
                       "pixel_std=[1,1,1]"))
    assert str(e.value).startswith(f"pixel_std=[1.0, 1.0, 1.0] contradicts {weights}, whose weights were "
                                   "trained with pixel std [57.375, 57.12, 58.395]")
    assert not (tmp_path / "other.h5").exists()


@pytest.mark.slow
def test_converted_x101_through_the_extract_cli_matches_detectron2(tmp_path):
    # the official layout at full size: 33 ResNeXt blocks, 32 groups x 8, converted from {"model": sd}
    sd, weights = _convert(tmp_path, "X-101-32x8d", residual_scale=0.2)
    jpeg = _jpeg_600x800(tmp_path / "images")
    out = tmp_path / "grid.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    cmd = [sys.executable, "-m", "gridvqa.extract", "extract=paper", "kind=grid", f"images_dir={jpeg.parent}",
           f"output={out}", f"weights={weights}", "device=cpu", "num_workers=0", "progress=false",
           "dtype=float32", f"paths.log_dir={tmp_path / 'logs'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    with open_features(out) as r:
        assert r.provenance["backbone"] == "X-101-32x8d" and r.provenance["pixel_std"] == X101_STD_LIST
        stored = np.asarray(r.get(42)["grid"])
    _check_against_detectron2(stored, sd, "X-101-32x8d", jpeg)
