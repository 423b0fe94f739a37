"""Extraction over a damaged feature file: a damaged part's images are extracted again, a truncated file
is refused with the option that starts afresh."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gridvqa.config import compose_config
from gridvqa.data.features import FeatureWriter, open_features
from gridvqa.errors import DataError
from gridvqa.extraction import run

ARGS = ("kind=grid", "weights=random", "image_size=[64,64]", "split=val")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from gridvqa.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, train_images=2, val_images=4, test_images=1, seed=7)
    return root


def cfg_for(data: Path, out: Path, *overrides: str):
    base = [f"paths.data_root={data}", f"output={out}", "num_workers=0", "progress=false", "batch_size=2"]
    return compose_config("extract", [*base, *ARGS, *overrides])


def read_all(path: Path) -> dict[int, dict]:
    with open_features(path) as r:
        return {i: r.get(i) for i in r.image_ids}


def test_damaged_part_is_extracted_again_and_truncated_file_suggests_overwrite(data, tmp_path):
    whole = tmp_path / "whole.h5"
    assert run(cfg_for(data, whole)).done_now == 4
    want = read_all(whole)

    # What an interrupted run leaves: an index and one part per image (same provenance as `run` writes).
    out = tmp_path / "out.h5"
    with open_features(whole) as r:
        prov, dtype = r.provenance, r.dtype
    with FeatureWriter(out, "grid", prov, dtype=dtype, consolidate=False) as w:
        for i, item in want.items():
            w.add_grid(i, item["grid"], item["image_size"])
            w.flush()
    parts = sorted((tmp_path / "out.h5.parts").glob("part-*.h5"))
    assert len(parts) == 4
    os.truncate(parts[2], parts[2].stat().st_size // 2)
    with pytest.raises(DataError, match=f"part file {parts[2]} is damaged"):
        open_features(out)

    s = run(cfg_for(data, out))
    assert (s.done_before, s.done_now) == (3, 1)
    got = read_all(out)
    assert sorted(got) == sorted(want)
    for i in want:
        np.testing.assert_array_equal(got[i]["grid"], want[i]["grid"])

    os.truncate(out, out.stat().st_size // 2)
    with pytest.raises(DataError) as e:
        run(cfg_for(data, out))
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "pass overwrite=true" in msg
