"""The extraction benchmark (gridvqa.benchmarks.extraction, scripts/bench_extraction.py) on R-tiny at
tiny sizes (real extraction, real files), and the grid output path it measures (extraction.grid_to_host)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gridvqa.benchmarks import extraction as bench_module
from gridvqa.data.features import FeatureWriter, GridFeatures
from gridvqa.extraction import grid_to_host
from gridvqa.reproduce import bench_ratios, extraction_markdown

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_extraction.py"
TINY = ["--arch", "R-tiny", "--size", "64", "96", "--device", "cpu"]  # 63x96 images after the resize


@pytest.fixture(scope="module")
def bench():
    return bench_module


def test_script_is_the_library_entry_point():
    """scripts/bench_extraction.py takes the library's flags: the same --help, the same main."""
    script = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    module = subprocess.run(
        [sys.executable, "-m", "gridvqa.benchmarks.extraction", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    flags = ("--arch", "--size", "--images", "--device", "--batch", "--backbone-batches", "--workers",
             "--precision", "--res5-dilation", "--proposals", "--extract-override", "--flops",
             "--no-breakdown", "--json")  # fmt: skip
    for flag in flags:
        assert flag in script.stdout, flag
    assert script.stdout.split("options:")[1] == module.stdout.split("options:")[1]


def run(bench, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_rows_per_precision_breakdown_and_ratios(bench, tmp_path, capsys):
    record = run(
        bench, tmp_path, "--images", "3", "--workers", "1", "--proposals", "50",
        "--precision", "float32", "bfloat16", "--backbone-batches", "2", "1",
    )  # fmt: skip
    text = capsys.readouterr().out
    res, parts = record["results"], record["breakdown"]
    # the rows other scripts read keep their names (the first precision's); the breakdown stays out of them
    assert list(res) == ["backbone", "grid", "region@50"]
    # the writer once more into RAM (/dev/shm), where Linux has it: the disk's share of its time
    in_ram = ["writer_in_memory"] if bench.MEMORY_DIR.is_dir() else []
    assert list(parts) == ["loader", "compute", "writer", *in_ram, "backbone_bn_unfolded"]
    if in_ram:
        assert parts["writer_in_memory"]["megabytes"] == parts["writer"]["megabytes"]
        assert "into RAM" in text
    assert record["options"]["fold_bn"] is True  # conf/extract.yaml's default: timed against the unfolded one
    assert list(record["precisions"]) == ["float32", "bfloat16"]
    assert record["precisions"]["float32"]["results"] == res
    for p in record["precisions"].values():
        assert list(p["results"]) == ["backbone", "grid", "region@50"]
        for r in p["results"].values():
            assert r["images"] == 3 and r["seconds"] > 0 and r["images_per_s"] > 0
            assert r["peak_memory_mb"] is None  # a CPU: no device memory figure
        sweep = p["results"]["backbone"]["sweep"]
        assert list(sweep) == ["1", "2"] and p["results"]["backbone"]["images_per_s"] == max(sweep.values())
    for r in parts.values():
        assert r["images"] == 3 and r["seconds"] > 0 and r["images_per_s"] > 0
    assert res["grid"]["close_seconds"] >= 0 and res["region@50"]["res5_regions_per_image"] == 50
    loader = parts["loader"]
    assert 0 < loader["startup_seconds"] <= loader["seconds"] and loader["after_startup_images_per_s"] > 0
    writer = parts["writer"]
    assert writer["grid_shape"] == [2, 3, 256] and writer["dtype"] == "float16"  # stride 32 by default
    assert writer["add_seconds"] + writer["commit_seconds"] == pytest.approx(writer["seconds"])
    assert writer["megabytes"] == pytest.approx(3 * 2 * 3 * 256 * 2 / 1e6)

    ratios = record["ratios"]
    for precision in ("float32", "bfloat16"):
        rows, r = record["precisions"][precision]["results"], ratios[precision]
        assert r["grid_over_backbone"] == pytest.approx(
            rows["grid"]["images_per_s"] / rows["backbone"]["images_per_s"]
        )
        grid_t = rows["grid"]["seconds"] / 3
        assert r["region@50_over_grid"] == pytest.approx(rows["region@50"]["seconds"] / 3 / grid_t)
    assert ratios["bn_folding_speedup"] == pytest.approx(
        res["backbone"]["images_per_s"] / parts["backbone_bn_unfolded"]["images_per_s"]
    )
    bf16 = record["precisions"]["bfloat16"]["results"]
    assert ratios["bfloat16_over_float32"]["grid"] == pytest.approx(
        bf16["grid"]["images_per_s"] / res["grid"]["images_per_s"]
    )
    assert record["options"]["preprocess"] == "workers" and record["environment"]["device"] == "cpu"
    capability = torch.backends.cpu.get_cpu_capability()  # CPU figures depend on it: named with them
    assert record["environment"]["cpu_capability"] == capability and f", {capability})" in text
    for name in ("loader", "compute", "writer", "where the grid run's time goes", "region@50 / grid",
                 "ratios, bfloat16", "bfloat16 / float32 throughput", "ms (its own thread)", "BN folding:",
                 "output stride 32"):  # fmt: skip
        assert name in text, name
    assert list(bench_ratios(record)) == ["region@50"]
    assert "loader" not in extraction_markdown(record)


def test_stride_16_and_no_region_rows(bench, tmp_path, capsys):
    record = run(bench, tmp_path, "--images", "2", "--workers", "0", "--res5-dilation", "2", "--proposals",
                 "--extract-override", "fold_bn=false")
    assert list(record["results"]) == ["backbone", "grid"]
    # BN not folded: nothing to compare against
    assert record["options"]["fold_bn"] is False and "backbone_bn_unfolded" not in record["breakdown"]
    assert "bn_folding_speedup" not in record["ratios"]
    assert record["breakdown"]["writer"]["grid_shape"] == [4, 6, 256]
    assert record["args"]["res5_dilation"] == 2 and "output stride 16" in capsys.readouterr().out
    assert "bfloat16_over_float32" not in record["ratios"]


def test_compute_part_takes_the_grid_runs_inputs_with_device_preprocessing(bench, tmp_path, monkeypatch):
    """With preprocess=device (a GPU's default) the compute part gets the loader's uint8 pixels and resizes
    them where the model runs, as the grid row does: the resize is in compute, not in no row at all."""
    seen = []

    def spy(group, pipeline, device):
        seen.append("raw_pixels" in group)
        return real(group, pipeline, device)

    real = bench.model_input
    monkeypatch.setattr(bench, "model_input", spy)
    record = run(bench, tmp_path, "--images", "2", "--workers", "0", "--proposals",
                 "--extract-override", "preprocess=device")
    assert record["options"]["preprocess"] == "device"
    assert record["breakdown"]["compute"]["images"] == 2
    assert seen and all(seen), seen


def test_no_breakdown(bench, tmp_path):
    record = run(bench, tmp_path, "--images", "1", "--workers", "0", "--proposals", "--no-breakdown")
    assert "breakdown" not in record and list(record["results"]) == ["backbone", "grid"]


def test_rate_after_the_loader_start_up_skips_each_workers_first_batch(bench):
    done_at = [(1.0, 2), (1.1, 2), (2.1, 2), (3.1, 1)]  # (time after a batch, its images)
    after = bench._after_startup(done_at, workers=2)
    assert after["after_startup_images"] == 3 and after["after_startup_images_per_s"] == pytest.approx(1.5)
    assert bench._after_startup(done_at, workers=0)["after_startup_images"] == 5  # one batch at least
    assert bench._after_startup(done_at[:2], workers=2) == {}


def _stored(path: Path, grid: np.ndarray | torch.Tensor) -> np.ndarray:
    with FeatureWriter(path, "grid", {"test": 1}, overwrite=True) as w:
        w.add_grid(1, grid, (64, 64))
    with GridFeatures(path) as r:
        return r.get(1)["grid"]


def test_grid_to_host_stores_the_same_bits_as_a_host_cast(tmp_path):
    g = torch.Generator().manual_seed(0)
    # a [C, H, W] map seen as [H, W, C] (as GridExtractor returns it), with values that need rounding,
    # float16 subnormals and the largest finite float16
    chw = torch.randn(64, 3, 5, generator=g) * torch.logspace(-7, 4, 64)[:, None, None]
    chw[0, 0, 0] = 65504.0
    grid = chw.permute(1, 2, 0)
    host = grid_to_host(grid, "float16")
    assert host.dtype == np.float16 and host.flags.c_contiguous and host.shape == (3, 5, 64)
    a = _stored(tmp_path / "device.h5", host)
    b = _stored(tmp_path / "host.h5", grid.numpy())  # the writer casts float32 itself
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    bf16 = (grid / 4).to(torch.bfloat16)  # autocast output (65504 itself rounds to 65536 in bfloat16)
    np.testing.assert_array_equal(grid_to_host(bf16, "float16"), bf16.float().numpy().astype(np.float16))
    assert grid_to_host(grid, "float32").dtype == np.float32


def test_grid_to_host_overflow_is_still_refused_by_the_writer(tmp_path):
    grid = torch.zeros(2, 2, 8)
    grid[1, 1, 3] = 1e6
    host = grid_to_host(grid, "float16")
    assert host.dtype == np.float32  # handed over uncast, so the writer's own check applies
    with pytest.raises(ValueError, match="overflow float16"):
        _stored(tmp_path / "g.h5", host)


def test_grid_variants_time_the_grid_row_with_each_setting_changed(bench, tmp_path, monkeypatch):
    backgrounds = []
    real = bench.FeatureWriter

    def spy(*a, **kw):
        backgrounds.append(kw.get("background"))
        return real(*a, **kw)

    monkeypatch.setattr(bench, "FeatureWriter", spy)
    record = run(bench, tmp_path, "--images", "3", "--workers", "0", "--proposals", "--grid-variant",
                 "writer_thread=false", "--grid-variant", "batch_size=2,num_workers=1")
    variants = record["grid_variants"]
    assert list(variants) == ["writer_thread=false", "batch_size=2,num_workers=1"]
    assert all(r["images"] == 3 and r["images_per_s"] > 0 for r in variants.values())
    # the grid row with its thread (then the writer part's own), the variant without, the other with it
    assert backgrounds[0] is True and backgrounds[-2:] == [False, True]
    assert "grid_variants" not in record["results"]  # not an extraction kind of its own


def test_pinned_host_delta_counts_new_blocks_and_their_microseconds():
    from gridvqa.benchmarks.common import pinned_host_allocs, pinned_host_delta, pinned_host_stats

    before = {"num_host_alloc": 1.0, "host_alloc_time.total": 50_000.0}
    after = {"num_host_alloc": 4.0, "host_alloc_time.total": 200_000.0}
    assert pinned_host_delta(before, after) == {"pinned_allocs": 3.0, "pinned_alloc_seconds": 0.15}
    assert pinned_host_delta(before, {"num_host_alloc": 1.0}) == {"pinned_allocs": 0.0}
    assert pinned_host_delta(None, after) == {} and pinned_host_delta(before, None) == {}
    cpu = torch.device("cpu")
    assert pinned_host_stats(cpu) is None
    with pinned_host_allocs(cpu) as row:
        torch.empty(1024)
    assert row == {}
