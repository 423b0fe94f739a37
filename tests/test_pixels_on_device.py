"""uint8 pixels from the workers, normalised on the model's device (data.normalize_on_device), and
FrozenBN in the input's dtype: the same network input and output as the float path."""

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

    def first_batch(on_device: bool) -> dict:
        dm = VQADataModule(str(tiny_shapes), image_size=None, short=64, max_size=96, num_workers=0,
                           batch_size=3, normalize_on_device=on_device)
        return next(iter(dm.loader("val")))

    plain, compact = first_batch(False), first_batch(True)
    assert plain["images"].dtype == torch.float32 and "pixel_norm" not in plain
    assert compact["images"].dtype == torch.uint8 and compact["pixel_norm"]["kind"] == "detectron2"
    assert compact["images"].element_size() * 4 == plain["images"].element_size()

    torch.manual_seed(0)
    dm = VQADataModule(str(tiny_shapes), num_workers=0)
    dm.dataset("val")
    model = VQAModule(source="pixels", head={"size": "tiny"}, answers=dm.vocab.answers,
                      tokenizer_json=dm.tokenizer.backend_tokenizer.to_str(),
                      backbone={"name": "R-tiny", "freeze_at": 0, "norm": "FrozenBN",
                                "channels_last": True}).eval()
    assert torch.equal(model.pixels(compact), model.pixels(plain))
    with torch.no_grad():
        assert torch.equal(model(compact), model(plain))


@pytest.mark.parametrize("norm", ["detectron2", "imagenet"])
def test_normalisation_is_torchvisions_bit_for_bit(norm):
    import torchvision.transforms.v2.functional as TF

    from gridvqa.data.images import Normalization

    n = Normalization.make(norm, std=(57.375, 57.12, 58.395) if norm == "detectron2" else None)
    x = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8)
    ref = x.float().flip(-3) if n.bgr else x.float() / 255.0
    assert torch.equal(n(x), TF.normalize(ref, list(n.mean), list(n.std)))
