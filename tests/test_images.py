"""Image loading, resize rules, normalisation, flips and batching (real files in tmp_path)."""

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from gridvqa.data.images import (
    PIXEL_NORMS,
    ImageError,
    ImagePipeline,
    ImageSpec,
    ResizeFixed,
    ResizeShortest,
    SkipCounter,
    build_image_pipeline,
    collate_images,
    feature_mask,
    load_image,
    resize_from_text,
    resize_text,
    resolve_image_spec,
    safe_load_image,
    shortest_edge_size,
)
from gridvqa.errors import ConfigError, DataError


def noise_jpeg(path, size=(64, 48)):
    Image.effect_noise(size, 60).convert("RGB").save(path, quality=90)
    return path


def pixel(img, x, y):
    return np.asarray(img)[y, x].tolist()


# --- loading -----------------------------------------------------------------------------------------


def test_rgb_jpeg_loads_fully(tmp_path):
    img = load_image(noise_jpeg(tmp_path / "a.jpg", (64, 48)))
    assert img.mode == "RGB" and img.size == (64, 48)


@pytest.mark.parametrize("mode,colour", [("L", 128), ("1", 1), ("CMYK", (0, 255, 255, 0))])
def test_other_modes_become_rgb(tmp_path, mode, colour):
    fmt = "PNG" if mode == "1" else "JPEG"
    Image.new(mode, (16, 8), colour).save(tmp_path / "x.jpg", format=fmt)
    img = load_image(tmp_path / "x.jpg")
    assert img.mode == "RGB" and img.size == (16, 8)
    want = {"L": [128] * 3, "1": [255] * 3, "CMYK": [255, 0, 0]}[mode]
    assert np.allclose(pixel(img, 8, 4), want, atol=3)


def test_rgba_and_la_are_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    im.putpixel((3, 1), (0, 0, 0, 0))  # transparent black -> white, not black
    im.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert pixel(img, 0, 0) == [255, 0, 0] and pixel(img, 3, 1) == [255, 255, 255]
    la = Image.new("LA", (2, 2), (0, 128))  # half-transparent black over white -> mid grey
    la.save(tmp_path / "la.png")
    assert np.allclose(pixel(load_image(tmp_path / "la.png"), 0, 0), [127] * 3, atol=1)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert pixel(img, 0, 0) == [255, 255, 255] and pixel(img, 2, 2) == [0, 0, 255]


def test_16bit_png_behind_jpg_name_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100, 65535, 257 * 200]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.jpg", format="PNG")
    with Image.open(tmp_path / "deep.jpg") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    img = load_image(tmp_path / "deep.jpg")
    assert [pixel(img, x, 0)[0] for x in range(4)] == [0, 100, 255, 200]


def test_float_image(tmp_path):
    a = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    img = load_image(tmp_path / "f.tif")
    assert [pixel(img, x, 0)[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 5, 5))  # red marker top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.size == (20, 40)  # width and height swapped
    assert pixel(img, 18, 1)[0] > 200 and pixel(img, 1, 1)[2] > 200  # marker now top-right


def test_errors_name_the_file_and_reason(tmp_path):
    good = noise_jpeg(tmp_path / "good.jpg", (200, 150)).read_bytes()
    (tmp_path / "half.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "random.jpg").write_bytes(os.urandom(2048))
    Image.effect_noise((80, 60), 60).save(tmp_path / "p.png")
    png = (tmp_path / "p.png").read_bytes()
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    cases = {"missing.jpg": "missing", "empty.jpg": "empty", "half.jpg": "truncated", "half.png": "truncated",
             "random.jpg": "undecodable"}
    for name, kind in cases.items():
        with pytest.raises(ImageError) as ei:
            load_image(tmp_path / name)
        msg = str(ei.value)
        assert ei.value.kind == kind, (name, msg)
        assert msg.startswith(str(tmp_path / name) + ": ") and "\n" not in msg
        assert isinstance(ei.value, DataError)


def _decodable_files(tmp_path):
    """Files of every kind load_image reads: plain JPEGs (torchvision's path in decode_rgb), and kinds
    decode_rgb leaves to Pillow (CMYK, PNG behind a .jpg name, 16-bit)."""
    files = {"rgb": noise_jpeg(tmp_path / "rgb.jpg", (67, 45))}
    Image.effect_noise((30, 21), 60).save(tmp_path / "grey.jpeg", quality=85)
    files["grey"] = tmp_path / "grey.jpeg"
    im = Image.effect_noise((40, 20), 60).convert("RGB")
    exif = Image.Exif()
    for orientation in (3, 6, 8):
        exif[0x0112] = orientation
        im.save(tmp_path / f"rot{orientation}.jpg", exif=exif.tobytes(), quality=95)
        files[f"exif{orientation}"] = tmp_path / f"rot{orientation}.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", format="JPEG")
    files["cmyk"] = tmp_path / "cmyk.jpg"
    Image.effect_noise((20, 10), 60).save(tmp_path / "png.jpg", format="PNG")
    files["png_named_jpg"] = tmp_path / "png.jpg"
    Image.fromarray((np.arange(200, dtype=np.uint16) * 300).reshape(10, 20)).save(tmp_path / "deep.png")
    files["16bit"] = tmp_path / "deep.png"
    return files


def test_decode_rgb_gives_load_images_bytes_for_every_kind_of_file(tmp_path):
    from gridvqa.data.images import decode_rgb

    for kind, path in _decodable_files(tmp_path).items():
        want = ImagePipeline.decode(load_image(path))
        got = decode_rgb(path)
        assert got.dtype == torch.uint8 and got.shape == want.shape, kind
        assert torch.equal(got, want), kind


def test_decode_rgb_reads_a_plain_jpeg_without_pillows_decoder(tmp_path, monkeypatch):
    # the fast path is really taken: with load_image gone, plain JPEGs still decode, to the same bytes
    import gridvqa.data.images as images

    path = noise_jpeg(tmp_path / "a.jpg", (64, 48))
    want = ImagePipeline.decode(load_image(path))

    def refuse(p):
        raise AssertionError(f"load_image called for {p}")

    monkeypatch.setattr(images, "load_image", refuse)
    assert torch.equal(images.decode_rgb(path), want)
    with pytest.raises(AssertionError, match="load_image called"):
        images.decode_rgb(_decodable_files(tmp_path)["cmyk"])


def test_decode_rgb_errors_are_load_images(tmp_path):
    from gridvqa.data.images import decode_rgb

    good = noise_jpeg(tmp_path / "good.jpg", (200, 150)).read_bytes()
    (tmp_path / "half.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "noend.jpg").write_bytes(good[:-2])
    (tmp_path / "holes.jpg").write_bytes(good[:400] + bytes(300) + good[700:])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "random.jpg").write_bytes(os.urandom(2048))
    for name in ("missing.jpg", "empty.jpg", "half.jpg", "noend.jpg", "holes.jpg", "random.jpg"):
        with pytest.raises(ImageError) as want:
            load_image(tmp_path / name)
        with pytest.raises(ImageError) as got:
            decode_rgb(tmp_path / name)
        assert str(got.value) == str(want.value) and got.value.kind == want.value.kind, name


def test_safe_load_counts_instead_of_raising(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    counter = SkipCounter()
    assert safe_load_image(tmp_path / "empty.jpg", counter) is None
    assert safe_load_image(tmp_path / "nope.jpg", counter) is None
    assert safe_load_image(noise_jpeg(tmp_path / "ok.jpg"), counter).size == (64, 48)
    assert counter.count == 2 and len(counter) == 2
    assert [p for p, _ in counter.items] == [str(tmp_path / "empty.jpg"), str(tmp_path / "nope.jpg")]
    assert "2 image(s) skipped" in counter.summary() and "empty.jpg" in counter.summary()
    assert SkipCounter().summary() == "no images skipped"
    assert safe_load_image(tmp_path / "nope.jpg") is None  # no counter is fine


# --- resize ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw,want", [
    ((480, 640), (600, 800)),
    ((300, 1200), (250, 1000)),
    ((640, 480), (800, 600)),
    ((600, 1000), (600, 1000)),
    ((20, 2000), (10, 1000)),
    ((333, 500), (600, 901)),  # 500 * 600/333 = 900.9 -> 901 (int(x + 0.5))
])
def test_shortest_edge_rule(hw, want):
    assert ResizeShortest(600, 1000).output_size(*hw) == want


def test_no_max_size_and_fixed():
    assert shortest_edge_size(300, 1200, 600, None) == (600, 2400)
    assert ResizeFixed(224, 320).output_size(480, 640) == (224, 320)
    with pytest.raises(ValueError):
        ResizeShortest(0)
    with pytest.raises(ValueError):
        ResizeFixed(0, 10)


def test_random_short_choice_is_reproducible():
    r = ResizeShortest([480, 576, 688], 1000)  # a list (as Hydra gives) becomes a tuple
    assert r.short == (480, 576, 688) and hash(r)
    a = [r.output_size(100, 100, random.Random(k))[0] for k in range(30)]
    b = [r.output_size(100, 100, random.Random(k))[0] for k in range(30)]
    c = [r.output_size(100, 100, np.random.default_rng(k))[0] for k in range(30)]
    assert a == b and set(a) == {480, 576, 688} and set(c) == {480, 576, 688}


# --- pipeline ----------------------------------------------------------------------------------------


def test_detectron2_normalisation_of_a_red_pixel():
    x, boxes, info = ImagePipeline(ResizeFixed(2, 2))(Image.new("RGB", (2, 2), (255, 0, 0)))
    assert x.dtype == torch.float32 and x.shape == (3, 2, 2) and boxes is None
    assert torch.allclose(x[:, 0, 0], torch.tensor([-103.530, -116.280, 255 - 123.675]))  # B, G, R
    x101_pipe = ImagePipeline(ResizeFixed(2, 2), std=[57.375, 57.120, 58.395])
    x101 = x101_pipe(Image.new("RGB", (2, 2), (255, 0, 0)))[0]
    want = torch.tensor([-103.530 / 57.375, -116.280 / 57.120, 131.325 / 58.395])
    assert torch.allclose(x101[:, 0, 0], want)


def test_imagenet_normalisation_and_roundtrip():
    pipe = ImagePipeline(ResizeFixed(2, 2), norm="imagenet")
    x, _, _ = pipe(Image.new("RGB", (2, 2), (255, 0, 0)))
    want = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    assert torch.allclose(x[:, 1, 1], want, atol=1e-6)
    img = Image.effect_noise((8, 6), 60).convert("RGB")
    for norm in ("imagenet", "detectron2"):
        p = ImagePipeline(ResizeFixed(6, 8), norm=norm)
        back = p.denormalize(p(img)[0])
        assert torch.equal(back, torch.from_numpy(np.array(img)).permute(2, 0, 1))
    with pytest.raises(ValueError):
        ImagePipeline(ResizeFixed(2, 2), norm="caffe")


def test_resize_scales_boxes_and_reports_info():
    img = Image.new("RGB", (640, 480))
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0]])
    x, b, info = ImagePipeline(ResizeShortest(600, 1000))(img, boxes)
    assert x.shape == (3, 600, 800)
    assert info == {"orig_size": (480, 640), "size": (600, 800), "scale": (1.25, 1.25), "flipped": False}
    assert torch.allclose(b, torch.tensor([[12.5, 25.0, 137.5, 275.0]]))
    _, b0, _ = ImagePipeline(ResizeFixed(240, 320))(img, torch.zeros(0, 4))
    assert b0.shape == (0, 4)


def test_flip_moves_pixels_and_boxes():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 20))  # white stripe on the left
    boxes = torch.tensor([[0.0, 2.0, 10.0, 8.0], [30.0, 0.0, 40.0, 20.0]])
    pipe = ImagePipeline(ResizeShortest(40, None), hflip_prob=1.0)  # 20x40 -> 40x80, then flipped
    x, b, info = pipe(img, boxes, rng=random.Random(0))
    assert info["flipped"] and info["size"] == (40, 80)
    w = 80
    scaled = boxes * 2
    want = torch.stack([w - scaled[:, 2], scaled[:, 1], w - scaled[:, 0], scaled[:, 3]], 1)
    assert torch.allclose(b, want) and torch.allclose(b[0], torch.tensor([60.0, 4.0, 80.0, 16.0]))
    rgb = pipe.denormalize(x)
    assert rgb[:, 20, -1].tolist() == [255, 255, 255] and rgb[:, 20, 0].tolist() == [0, 0, 0]
    never = ImagePipeline(ResizeShortest(20, None), hflip_prob=0.0)
    assert not never(img, rng=random.Random(0))[2]["flipped"]
    half = ImagePipeline(ResizeFixed(4, 4), hflip_prob=0.5)
    flips = [half(img, rng=random.Random(k))[2]["flipped"] for k in range(40)]
    assert 5 < sum(flips) < 35


def test_extreme_aspect_ratio_through_pipeline():
    x, _, info = ImagePipeline(ResizeShortest(600, 1000))(Image.new("RGB", (2000, 20)))
    assert x.shape == (3, 10, 1000) and info["scale"] == (0.5, 0.5)


# --- batching ----------------------------------------------------------------------------------------


def test_collate_pads_to_divisibility_with_mask():
    a, b = torch.ones(3, 600, 800), torch.full((3, 300, 200), 2.0)
    batch, mask, sizes = collate_images([a, b], size_divisibility=32, pad_value=-1.0)
    assert batch.shape == (2, 3, 608, 800) and mask.shape == (2, 608, 800) and mask.dtype == torch.bool
    assert sizes.tolist() == [[600, 800], [300, 200]]
    assert mask[0].sum() == 600 * 800 and mask[1].sum() == 300 * 200
    assert mask[1, 299, 199] and not mask[1, 300, 0] and not mask[1, 0, 200]
    assert batch[1, 0, 299, 199] == 2.0 and batch[1, 0, 300, 0] == -1.0 and batch[0, 0, 600, 0] == -1.0
    same, _, _ = collate_images([torch.zeros(3, 5, 7)], size_divisibility=0)
    assert same.shape == (1, 3, 5, 7)
    with pytest.raises(ValueError):
        collate_images([])


def test_feature_mask_uses_ceil_of_valid_size():
    _, mask, _ = collate_images([torch.zeros(3, 600, 800), torch.zeros(3, 300, 200)], 32)
    fm = feature_mask(mask, (19, 25))
    assert fm.shape == (2, 19, 25)
    assert fm[0].all()  # ceil(600/32) = 19, 800/32 = 25
    assert fm[1].sum() == 10 * 7 and fm[1, 9, 6] and not fm[1, 10, 0] and not fm[1, 0, 7]
    fm16 = feature_mask(mask, (38, 50), stride=16)
    assert fm16[1].sum() == 19 * 13  # ceil(300/16) = 19, ceil(200/16) = 13


# --- one image configuration -------------------------------------------------------------------------

X101_STD = (57.375, 57.120, 58.395)


def test_image_spec_round_trips_and_reads_every_config_spelling():
    from omegaconf import OmegaConf

    spec = ImageSpec(short=[480, 600], max_size=1000, norm="detectron2", std=list(X101_STD), hflip=0.5)
    assert spec.short == (480, 600) and spec.std == X101_STD and spec.mean is None
    assert ImageSpec.from_mapping(spec.to_dict()) == spec
    flat = OmegaConf.create({"image_size": None, "short": [480, 600], "max_size": 1000, "norm": "detectron2",
                             "pixel_mean": None, "pixel_std": list(X101_STD), "hflip_prob": 0.5,
                             "batch_size": 8})  # keys of other settings are not its business
    assert ImageSpec.from_mapping(flat) == spec
    fixed = ImageSpec(size=(448, 448))
    assert fixed.to_dict() == {"size": [448, 448], "short": None, "max_size": None, "norm": None,
                               "mean": None, "std": None, "hflip": 0.0}
    assert isinstance(fixed.resize(), ResizeFixed) and fixed.resize().output_size(3, 9) == (448, 448)
    assert spec.resize() == ResizeShortest((480, 600), 1000)
    # the pipeline it builds is the one ImagePipeline's own arguments give
    img = Image.effect_noise((40, 30), 60).convert("RGB")
    a = build_image_pipeline(ImageSpec(short=24, max_size=40, std=X101_STD))(img)[0]
    b = ImagePipeline(ResizeShortest(24, 40), std=X101_STD)(img)[0]
    assert torch.equal(a, b)
    for resize in (ResizeFixed(448, 448), ResizeShortest(600, 1000), ResizeShortest(600, None)):
        assert resize_from_text(resize_text(resize)) == resize
    assert resize_from_text("something else") is None


@pytest.mark.parametrize("cfg,key", [
    ({"image_size": [0, 0]}, "data.image_size"),
    ({"image_size": [448]}, "data.image_size"),
    ({"short": 0}, "data.short"),
    ({"short": 600, "max_size": -1}, "data.max_size"),
    ({"image_size": [8, 8], "norm": "caffe"}, "data.norm"),
    ({"image_size": [8, 8], "pixel_std": [1, 0, 1]}, "data.pixel_std"),
    ({"image_size": [8, 8], "pixel_mean": [1, 2]}, "data.pixel_mean"),
    ({"image_size": [8, 8], "hflip_prob": 2}, "data.hflip_prob"),
    ({"image_size": None, "short": None}, "data.image_size"),
])
def test_bad_image_settings_name_their_key(cfg, key):
    with pytest.raises(ConfigError) as e:
        ImageSpec.from_mapping(cfg, prefix="data.")
    assert key in str(e.value) and "\n" not in str(e.value)


def _weights_with_norm(path, norm):
    from gridvqa.models.weights import pixel_norm_metadata, save_safetensors

    save_safetensors({"body.conv1.weight": torch.zeros(1)}, path, pixel_norm_metadata(norm))
    return path


def test_recorded_normalisation_is_used_unless_a_set_key_contradicts_it(tmp_path):
    x101 = _weights_with_norm(tmp_path / "x101.safetensors", PIXEL_NORMS["detectron2_x101"])
    plain = _weights_with_norm(tmp_path / "plain.safetensors", None)  # nothing recorded (older files)
    spec = ImageSpec.from_mapping({"image_size": [4, 4], "norm": None, "pixel_std": None}, prefix="data.")
    assert resolve_image_spec(spec, x101).std == X101_STD
    assert resolve_image_spec(spec, plain).std == (1.0, 1.0, 1.0)  # detectron2's default
    assert resolve_image_spec(spec, None).std == (1.0, 1.0, 1.0)
    agreeing = ImageSpec.from_mapping({"image_size": [4, 4], "norm": "detectron2", "pixel_std": X101_STD})
    assert resolve_image_spec(agreeing, x101).std == X101_STD
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    x = build_image_pipeline(spec, x101)(red)[0]
    assert torch.allclose(x[:, 0, 0], torch.tensor([-103.530 / 57.375, -116.280 / 57.120, 131.325 / 58.395]))
    for cfg, key in (({"pixel_std": [1, 1, 1]}, "data.pixel_std=[1.0, 1.0, 1.0]"),
                     ({"norm": "imagenet"}, "data.norm=imagenet"),
                     ({"pixel_mean": [0, 0, 0]}, "data.pixel_mean=[0.0, 0.0, 0.0]")):
        bad = ImageSpec.from_mapping({"image_size": [4, 4], **cfg}, prefix="data.")
        with pytest.raises(ConfigError) as e:
            resolve_image_spec(bad, x101)
        msg = str(e.value)
        assert msg.startswith(f"{key} contradicts {x101}, whose weights were trained with pixel ")
        assert "\n" not in msg
    broken = tmp_path / "broken.safetensors"
    from gridvqa.models.weights import save_safetensors

    save_safetensors({"w": torch.zeros(1)}, broken, {"pixel_norm": '{"kind": "caffe"}'})
    with pytest.raises(DataError, match="broken.safetensors: the safetensors metadata `pixel_norm`"):
        resolve_image_spec(spec, broken)


# --- degenerate sizes --------------------------------------------------------------------------------


def test_a_thin_strip_keeps_at_least_one_pixel_per_side():
    assert shortest_edge_size(1, 3000, 600, 1000) == (1, 1000)
    assert shortest_edge_size(3000, 1, 600, 1000) == (1000, 1)
    for size, want in (((3000, 1), (1, 1000)), ((1, 3000), (1000, 1))):
        x, boxes, info = ImagePipeline(ResizeShortest(600, 1000))(Image.new("RGB", size), torch.zeros(0, 4))
        assert tuple(x.shape[-2:]) == want == info["size"] and torch.isfinite(x).all()


class UnclampedResize(ResizeShortest):
    """detectron2's rounding without the 1-pixel floor: a 1x3000 strip becomes 0 pixels high, and the
    resize refuses it (a real failure inside a loader worker)."""

    def output_size(self, h, w, rng=None):
        scale = self.short / min(h, w)
        nh, nw = (self.short, scale * w) if h < w else (scale * h, self.short)
        s = min(1.0, self.max_size / max(nh, nw))
        return int(nh * s + 0.5), int(nw * s + 0.5)


def _small_data(root):
    from gridvqa.data.prepare import prepare
    from gridvqa.data.synthetic import generate

    generate(root, train_images=2, val_images=2, test_images=1, seed=4)
    prepare(root, min_count=1)
    return root


def test_an_image_that_cannot_be_prepared_is_skipped_and_counted_by_every_loader(tmp_path):
    from gridvqa.data import layout
    from gridvqa.data.detection_data import VGDataModule
    from gridvqa.data.vqa_data import VQADataModule
    from gridvqa.extraction import ExtractionDataset, ImageItem, collate_extraction

    root = _small_data(tmp_path / "data")
    failing = ImagePipeline(UnclampedResize(600, 1000))
    with pytest.raises(ValueError):
        failing(Image.new("RGB", (3000, 1)))  # what the loaders below meet

    # VQA: one image of val replaced by a 1x3000 strip
    dm = VQADataModule(str(root), image_size=None, short=600, max_size=1000, num_workers=0)
    ds = dm.dataset("val")
    strip_id = ds.entries[0].image_id
    Image.new("RGB", (3000, 1), (9, 9, 9)).save(layout.coco_image_path(root, "val", strip_id))
    items = [ds[i] for i in range(len(ds))]
    assert all("image" in it for it in items) and not ds.skipped.count  # the real pipeline copes
    ds.pipeline = failing
    items = [ds[i] for i in range(len(ds))]
    assert sum(it is None or "image" not in it for it in items) == 1 and ds.skipped.count == 1
    assert "ValueError" in ds.skipped.items[0][1]

    # VG detection data
    vg = VGDataModule(str(root), train_short=600, test_short=600, max_size=1000, num_workers=0)
    vg.setup()
    vds = vg.train_set
    rec = vg.vg[vds.indices[0]]
    Image.new("RGB", (3000, 1)).save(vg.vg.image_path(rec.image_id))
    assert vds[0] is not None and vds[0]["image"].shape[-2:] == (1, 1000)
    vds.pipeline = failing
    assert vds[0] is None and vds.skipped.count == 1 and "ValueError" in vds.skipped.items[0][1]

    # extraction: the item carries the reason, the batch lists it apart
    path = layout.coco_image_path(root, "val", strip_id)
    other = layout.coco_image_path(root, "val", ds.entries[-1].image_id)
    eds = ExtractionDataset([ImageItem(1, path), ImageItem(2, other)], failing)
    batch = collate_extraction([eds[0], eds[1]])
    assert [i for i, _ in batch["failed"]] == [0] and "ValueError" in batch["failed"][0][1]
    assert [g["index"] for g in batch["groups"]] == [[1]]
