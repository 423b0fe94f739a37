"""Grid probes: the cell under each box centre, and linear probes that score what the cells carry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gridvqa.data.images import ImagePipeline, ResizeFixed
from gridvqa.data.vg import VisualGenome
from gridvqa.errors import DataError
from gridvqa.metrics.grid_probe import CellSamples, centre_cells, probe

ROOT = Path(__file__).resolve().parents[1]


class CoordinateMap(nn.Module):
    """A 'backbone' whose res5 cell (i, j) holds (i, j): shows which cell each object was read from."""

    stride = 16

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return {"res5": torch.stack([ii, jj]).float()[None].expand(x.shape[0], -1, -1, -1)}


def test_centre_cells_reads_the_cell_under_each_box_centre(tiny_shapes):
    pipeline = ImagePipeline(ResizeFixed(128, 128))
    samples, vg = centre_cells(CoordinateMap(), tiny_shapes / "vg", pipeline, images=5)
    recs = vg.records[:5]
    assert samples.features.shape[0] == sum(len(r.labels) for r in recs)
    expected = []
    for r in recs:
        sy, sx = 128 / r.height, 128 / r.width
        for x1, y1, x2, y2 in r.boxes:
            expected.append([int((y1 + y2) / 2 * sy // 16), int((x1 + x2) / 2 * sx // 16)])
    assert samples.features.tolist() == [[float(i), float(j)] for i, j in expected]
    assert samples.labels.tolist() == [int(v) for r in recs for v in r.labels]


def _clusters(n: int, classes: int, separable: bool) -> CellSamples:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(1, classes + 1, (n,), generator=g)
    centres = torch.randn(classes + 1, 16, generator=g) * 4
    x = torch.randn(n, 16, generator=g)
    if separable:
        x = x + centres[labels]
    attrs = torch.stack([labels - 1, torch.full_like(labels, -1)], 1)  # attribute = class - 1
    return CellSamples(x, labels, attrs, torch.rand(n, generator=g) * 100)


def test_probe_scores_separable_cells_high_and_noise_near_chance():
    good = probe(_clusters(400, 4, separable=True), num_attributes=4)
    assert good["class_acc"] > 0.95 and good["attribute_top1_acc"] > 0.95
    assert good["objects"] == 400 and good["test_objects"] == 200
    noise = probe(_clusters(400, 4, separable=False), num_attributes=4)
    assert noise["class_acc"] < 0.45  # 4 balanced classes: chance is 0.25


def test_probe_needs_objects():
    with pytest.raises(DataError, match="too few"):
        probe(_clusters(3, 2, separable=True), num_attributes=2)


def test_probe_grid_script_runs_on_the_built_in_format(tiny_shapes, capsys):
    spec = importlib.util.spec_from_file_location("probe_grid", ROOT / "scripts" / "probe_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--weights", "none", "--data", str(tiny_shapes), "--size", "96", "96",
                     "--images", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    n = sum(len(r.labels) for r in VisualGenome(tiny_shapes / "vg").records[:16])
    assert out["objects"] == n and 0.0 <= out["class_acc"] <= 1.0 and "attribute_top1_acc" in out
