"""uint8 pixels from the workers, normalised (data.normalize_on_device) or resized and normalised
(data.resize_on_device) on the model's device, and FrozenBN in the input's dtype: the same network input
and output as the float path."""

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from gridvqa.data.images import ImagePipeline, ResizeShortest, collate_images, normalize_batch
from gridvqa.models.backbone import FrozenBN


@pytest.mark.parametrize("norm", ["detectron2", "imagenet"])
def test_normalising_a_padded_uint8_batch_equals_normalising_before_padding(norm):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in ((50, 70), (64, 40), (33, 90))]
    as_float = ImagePipeline(ResizeShortest(40, 80), norm=norm)
    as_uint8 = ImagePipeline(ResizeShortest(40, 80), norm=norm, normalize=False)
    floats = [as_float(im)[0] for im in images]
    uint8s = [as_uint8(im)[0] for im in images]
    assert all(t.dtype == torch.uint8 for t in uint8s)
    want, mask, sizes = collate_images(floats)
    got_u8, got_mask, got_sizes = collate_images(uint8s)
    assert torch.equal(mask, got_mask) and torch.equal(sizes, got_sizes)
    got = normalize_batch(got_u8, got_mask, as_uint8.normalization.to_dict())
    assert got.dtype == torch.float32 and torch.equal(got, want)  # the same floats, padding 0 included


def test_frozen_bn_keeps_the_input_dtype_and_torchvision_values():
    torch.manual_seed(0)
    ours, theirs = FrozenBN(8), FrozenBatchNorm2d(8)
    stats = {"weight": torch.rand(8) + 0.5, "bias": torch.randn(8), "running_mean": torch.randn(8),
             "running_var": torch.rand(8) + 0.1}
    ours.load_state_dict(stats)
    theirs.load_state_dict(stats)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ours(x), theirs(x))
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16  # torchvision's returns float32 here
    assert torch.allclose(y.float(), theirs(x), atol=0.1, rtol=0.02)
    assert theirs(x.bfloat16()).dtype == torch.float32


def test_vqa_batches_of_uint8_pixels_give_the_same_answers(tiny_shapes):
    from gridvqa.data.vqa_data import VQADataModule
    from gridvqa.lit.vqa_module import VQAModule

    def first_batch(on_device: bool, resize: bool = False) -> dict:
        dm = VQADataModule(str(tiny_shapes), image_size=None, short=64, max_size=96, num_workers=0,
                           batch_size=3, normalize_on_device=on_device, resize_on_device=resize)
        return next(iter(dm.loader("val")))

    plain, compact, unresized = first_batch(False), first_batch(True), first_batch(False, resize=True)
    assert plain["images"].dtype == torch.float32 and "pixel_norm" not in plain
    assert compact["images"].dtype == torch.uint8 and compact["pixel_norm"]["kind"] == "detectron2"
    assert compact["images"].element_size() * 4 == plain["images"].element_size()
    assert unresized["raw_pixels"].dtype == torch.uint8 and "images" not in unresized
    for key in ("pixel_mask", "image_sizes", "q_ids", "target"):
        assert torch.equal(unresized[key], plain[key]), key

    torch.manual_seed(0)
    dm = VQADataModule(str(tiny_shapes), num_workers=0)
    dm.dataset("val")
    model = VQAModule(source="pixels", head={"size": "tiny"}, answers=dm.vocab.answers,
                      tokenizer_json=dm.tokenizer.backend_tokenizer.to_str(),
                      backbone={"name": "R-tiny", "freeze_at": 0, "norm": "FrozenBN",
                                "channels_last": True}).eval()
    assert torch.equal(model.pixels(compact), model.pixels(plain))
    assert torch.equal(model.pixels(unresized), model.pixels(plain))
    with torch.no_grad():
        assert torch.equal(model(compact), model(plain))
        assert torch.equal(model(unresized), model(plain))


@pytest.mark.parametrize("norm", ["detectron2", "imagenet"])
def test_normalisation_is_torchvisions_bit_for_bit(norm):
    import torchvision.transforms.v2.functional as TF

    from gridvqa.data.images import Normalization

    n = Normalization.make(norm, std=(57.375, 57.12, 58.395) if norm == "detectron2" else None)
    x = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8)
    ref = x.float().flip(-3) if n.bgr else x.float() / 255.0
    assert torch.equal(n(x), TF.normalize(ref, list(n.mean), list(n.std)))


@pytest.mark.parametrize("flip", [False, True])
def test_a_mixed_size_batch_resized_in_one_go_is_pillows_bytes(flip):
    import numpy as np
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    from gridvqa.data.images import resize_batch_uint8, resize_pil, resize_taps

    g = np.random.default_rng(0)
    ins = [(50, 70), (64, 40), (33, 90), (80, 80), (40, 40), (9, 200)]
    outs = [(40, 56), (80, 50), (40, 109), (80, 80), (64, 64), (3, 100)]  # down, up, mixed, same size
    flips = [flip and i % 2 == 0 for i in range(len(ins))]
    images = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ins]
    flat = torch.cat([torch.from_numpy(np.array(im)).reshape(-1) for im in images])  # HWC each
    got = resize_batch_uint8(flat, resize_taps(ins, outs, (96, 128), flips))
    assert got.dtype == torch.uint8 and got.shape == (len(ins), 3, 96, 128)
    for b, (im, (h, w), f) in enumerate(zip(images, outs, flips, strict=True)):
        want = TF.pil_to_tensor(resize_pil(im, (h, w)))
        assert torch.equal(got[b, :, :h, :w], want.flip(-1) if f else want), b
        assert not got[b, :, h:].any() and not got[b, :, :, w:].any()  # zero outside each image


def test_the_unresized_path_makes_the_pipelines_batch(tiny_shapes):
    import random

    from PIL import Image

    from gridvqa.data.images import collate_unresized, decode_rgb, resize_batch_uint8

    pipeline = ImagePipeline(ResizeShortest((40, 56), 80), hflip_prob=0.5, normalize=False)
    paths = sorted(tiny_shapes.rglob("*.jpg"))[:5]
    whole = [pipeline(Image.open(p), rng=random.Random(i)) for i, p in enumerate(paths)]
    planned = [pipeline.unresized(decode_rgb(p), rng=random.Random(i)) for i, p in enumerate(paths)]
    assert [info for _, _, info in whole] == [info for _, info in planned]  # the same random draws
    want, want_mask, want_sizes = collate_images([x for x, _, _ in whole])
    batch = collate_unresized([x for x, _ in planned], [i["size"] for _, i in planned],
                              [i["flipped"] for _, i in planned])
    assert batch["raw_pixels"].numel() == sum(x.numel() for x, _ in planned)  # no padding on the host
    assert torch.equal(batch["pixel_mask"], want_mask) and torch.equal(batch["image_sizes"], want_sizes)
    assert torch.equal(resize_batch_uint8(batch["raw_pixels"], batch["resize_taps"]), want)


def _collate_both(items):
    from gridvqa.data.images import collate_unresized

    tensors = [t for t, _ in items]
    padded = collate_images(tensors)
    raw = collate_unresized(tensors, [s for _, s in items])
    # where they were made (any tensor reaches the main process in shared memory, made so or copied)
    made_shared = (padded[0].is_shared(), padded[1].is_shared(), raw["raw_pixels"].is_shared())
    return padded, raw, made_shared


def test_batches_collated_in_a_worker_are_made_in_shared_memory_with_the_same_values():
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(3)
    items = [(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), (40, 56))
             for h, w in ((30, 50), (45, 20), (33, 33))]
    want_padded, want_raw, here = _collate_both(items)
    assert here == (False, False, False)
    loader = DataLoader([items], batch_size=None, num_workers=1, collate_fn=_collate_both)
    (got_padded, got_raw, there), = loader
    assert there == (True, True, True)
    for want, got in zip(want_padded, got_padded, strict=True):
        assert torch.equal(got, want)  # the padding zero as in private memory
    assert torch.equal(got_raw["raw_pixels"], want_raw["raw_pixels"])
    assert torch.equal(got_raw["pixel_mask"], want_raw["pixel_mask"])


def test_a_training_run_resizing_on_the_device_learns_the_same_weights(tiny_shapes, tmp_path):
    # the real entry point (Hydra config, Lightning fit, a loader worker): bit-identical pixels either way,
    # so the same seed trains the same weights
    from gridvqa.models.safe_load import load_torch_file
    from test_loggers import run_short

    weights = {}
    for on_device in (False, True):
        out = tmp_path / str(on_device)
        run_short(tiny_shapes, out, [f"data.resize_on_device={str(on_device).lower()}", "data.num_workers=1",
                                     "data.normalize_on_device=false"])
        (published,) = (out / "artifacts").rglob("model.ckpt")
        ckpt = load_torch_file(published)
        assert ckpt["datamodule_hyper_parameters"]["resize_on_device"] is on_device
        weights[on_device] = ckpt["state_dict"]
    assert weights[False].keys() == weights[True].keys() and len(weights[True]) > 10
    for key, value in weights[False].items():
        assert torch.equal(weights[True][key], value), key
