"""The code paths that exist only on a GPU: run where CUDA is (scripts/gpu_check.sh's machine), skipped
elsewhere. Each compares with the CPU path it stands in for."""

import numpy as np
import pytest
import torch

from gridvqa.data.images import ImagePipeline, ResizeShortest, collate_images, normalize_batch
from gridvqa.extraction import HostGrids, grid_to_host

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_host_grids_from_the_gpu_are_the_host_casts_bits():
    g = torch.Generator().manual_seed(0)
    grids = [torch.randn(3, 5, 16, generator=g) * 100, torch.randn(2, 7, 16, generator=g)]
    grids.append(torch.full((1, 2, 16), 1e6))  # overflows float16: goes over as float32
    pending = HostGrids([x.cuda() for x in grids], "float16")
    later = torch.randn(512, 512, device="cuda") @ torch.randn(512, 512, device="cuda")  # queued after
    got = pending.wait()
    for x, y in zip(grids, got, strict=True):
        want = grid_to_host(x, "float16")
        assert y.dtype == want.dtype
        np.testing.assert_array_equal(y, want)
    assert later.shape == (512, 512)


def test_uint8_batches_normalised_on_the_gpu_equal_the_workers_floats():
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in ((50, 70), (64, 40))]
    as_float = ImagePipeline(ResizeShortest(40, 80))
    as_uint8 = ImagePipeline(ResizeShortest(40, 80), normalize=False)
    want = collate_images([as_float(im)[0] for im in images])[0]
    pixels, mask, _ = collate_images([as_uint8(im)[0] for im in images])
    got = normalize_batch(pixels.cuda(), mask.cuda(), as_uint8.normalization)
    assert torch.equal(got.cpu(), want)


def test_the_device_side_of_an_extraction_batch_never_waits_for_the_gpu():
    # Resize, normalisation and the start of the copy back are queued without a host sync, so a batch's
    # preparation does not wait for the forward of the batch before it (sizes seen once are cached).
    from torch.utils.data._utils.pin_memory import pin_memory

    from gridvqa.data.images import ResizeFixed, collate_unresized
    from gridvqa.extraction import model_input

    pipeline = ImagePipeline(ResizeFixed(48, 64))
    images = [torch.randint(0, 256, (3, h, 50), dtype=torch.uint8) for h in (40, 30)]
    group = pin_memory(collate_unresized(images, [(48, 64), (48, 64)]))  # as the loader hands it over

    def batch() -> None:
        x = model_input(group, pipeline, torch.device("cuda"))
        HostGrids([x[0].permute(1, 2, 0), x[1].permute(1, 2, 0)], "float16")

    batch()  # the taps and constants reach the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_batch_resized_on_the_gpu_is_the_cpus_and_never_waits():
    # data.resize_on_device: the taps travel pinned with the batch, so resizing queues without a host sync
    from gridvqa.data.images import collate_unresized, resize_batch_uint8

    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in ((480, 640), (427, 640), (640, 480))]
    batch = collate_unresized(images, [(448, 448)] * 3, [False, True, False])
    want = resize_batch_uint8(batch["raw_pixels"], batch["resize_taps"])
    pinned = {k: v.pin_memory() for k, v in batch["resize_taps"].items()}
    pixels = batch["raw_pixels"].pin_memory()
    resize_batch_uint8(pixels.cuda(), {k: v.cuda() for k, v in pinned.items()})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        taps = {k: v.to("cuda", non_blocking=True) for k, v in pinned.items()}
        got = resize_batch_uint8(pixels.to("cuda", non_blocking=True), taps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)


def test_pinned_host_allocs_count_a_new_page_locked_block():
    from gridvqa.benchmarks.common import pinned_host_allocs

    with pinned_host_allocs(torch.device("cuda")) as row:
        block = torch.empty((96 << 20) + 1, dtype=torch.uint8, pin_memory=True)  # a size not cached yet
    assert block.is_pinned()
    assert row["pinned_allocs"] >= 1 and row["pinned_alloc_seconds"] > 0
