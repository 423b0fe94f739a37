"""Resize + normalisation on the extraction device from uint8 (decode_rgb, collate_extraction's groups
through model_input, resize_uint8) against the loader-worker path (ImagePipeline.__call__ with Pillow):
the same bytes, and the same feature files; the background writer thread gives the same file as writing
in the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gridvqa.data.images import (
    ImagePipeline,
    ResizeFixed,
    ResizeShortest,
    resize_pil,
    resize_uint8,
)
from gridvqa.extraction import run
from test_extract import data, make_cfg, read_all  # noqa: F401 - the module-scoped data fixture


def _pil_bytes(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # blocks and noise: flat areas and edges, so rounding differences would show
    blocks = rng.integers(0, 256, (max(1, h // 7), max(1, w // 7), 3), dtype=np.uint8)
    big = np.repeat(np.repeat(blocks, 7, 0), 7, 1)
    pad = ((0, max(0, h - big.shape[0])), (0, max(0, w - big.shape[1])), (0, 0))
    big = np.pad(big, pad, mode="edge")[:h, :w]
    noise = rng.integers(-12, 13, (h, w, 3))
    return np.clip(big.astype(int) + noise, 0, 255).astype(np.uint8)


def test_resize_uint8_gives_the_bytes_of_the_worker_resize_for_any_sizes():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        nh, nw = (int(v) for v in rng.integers(1, 400, 2))
        arr = _random_image(rng, h, w)
        want = _pil_bytes(resize_pil(Image.fromarray(arr), (nh, nw)))
        got = resize_uint8(torch.from_numpy(arr).permute(2, 0, 1), (nh, nw))
        assert got.dtype == torch.uint8 and torch.equal(got, want), ((h, w), (nh, nw))


def test_one_axis_resizes_are_pillows_own_and_two_axes_within_one_level():
    """Each pass is Pillow's bilinear bit for bit; Pillow's one-call resize (detectron2's) may run its two
    passes in the other order, which moves some pixels by one level, never more."""
    rng = np.random.default_rng(1)
    arr = _random_image(rng, 97, 131)
    im = Image.fromarray(arr)
    x = torch.from_numpy(arr).permute(2, 0, 1)
    for size in ((97, 200), (97, 40), (150, 131), (30, 131)):
        pillow = _pil_bytes(im.resize(size[::-1], Image.Resampling.BILINEAR))
        assert torch.equal(resize_uint8(x, size), pillow)
    for size in ((150, 200), (40, 300), (600, 57)):
        pillow = _pil_bytes(im.resize(size[::-1], Image.Resampling.BILINEAR)).int()
        assert (resize_uint8(x, size).int() - pillow).abs().max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(x.float(), (10, 10))


@pytest.mark.parametrize("resize", [ResizeShortest(64, 100), ResizeFixed(48, 80)])
@pytest.mark.parametrize(
    "shapes",
    [((50, 70), (47, 71), (60, 52)), ((50, 70), (50, 70), (47, 71), (50, 70), (50, 70), (50, 70))],
    ids=["all-different", "runs-of-one-size"],
)
def test_device_groups_equal_the_collated_worker_outputs(resize, shapes, tmp_path):
    from gridvqa.extraction import ExtractionDataset, ImageItem, collate_extraction, model_input

    rng = np.random.default_rng(2)
    pipe = ImagePipeline(resize, "detectron2", std=(57.375, 57.120, 58.395))
    items = []
    for i, (h, w) in enumerate(shapes):  # lossless files: both paths decode exactly these bytes
        Image.fromarray(_random_image(rng, h, w)).save(tmp_path / f"{i}.png")
        items.append(ImageItem(i + 1, tmp_path / f"{i}.png"))
    by_path = {}
    for preprocess in ("workers", "device"):
        ds = ExtractionDataset(items, pipe, preprocess)
        by_path[preprocess] = collate_extraction([ds[i] for i in range(len(items))])["groups"]
    assert [g["index"] for g in by_path["device"]] == [g["index"] for g in by_path["workers"]]
    for want, group in zip(by_path["workers"], by_path["device"], strict=True):
        assert "raw_pixels" in group and "images" not in group
        got = model_input(group, pipe, torch.device("cpu"))
        assert got.shape == want["images"].shape
        torch.testing.assert_close(got, want["images"], rtol=0, atol=1e-5)  # the same float ops, same bytes


def test_device_preprocessing_and_the_writer_thread_give_the_same_file(data, tmp_path):  # noqa: F811
    common = ("kind=grid", "weights=random", "image_size=null", "short=64", "max_size=100", "batch_size=2",
              "split=train", "dtype=float32", "commit_images=2")
    files = {}
    for name, extra in (("workers", ("preprocess=workers", "writer_thread=false")),
                        ("device", ("preprocess=device", "writer_thread=false")),
                        ("thread", ("preprocess=workers", "writer_thread=true", "num_workers=2"))):
        out = tmp_path / f"{name}.h5"
        assert run(make_cfg(data, out, None, *common, *extra)).done_now == 6
        files[name] = read_all(out)
    ref = files["workers"]
    for name in ("device", "thread"):
        assert sorted(files[name]) == sorted(ref) == [1, 2, 3, 4, 5, 6]
        for i in ref:
            np.testing.assert_array_equal(files[name][i]["grid"], ref[i]["grid"])
            np.testing.assert_array_equal(files[name][i]["image_size"], ref[i]["image_size"])
