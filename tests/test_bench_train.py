"""The training benchmark (gridvqa.benchmarks.training, scripts/bench_train.py): the real configs it composes,
and a --quick run of the real Lightning step on a tiny generated set, with its rows and ratios."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gridvqa.benchmarks import training

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_script_is_the_library_entry_point():
    script = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    module = subprocess.run(
        [sys.executable, "-m", "gridvqa.benchmarks.training", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    for flag in ("--preset", "--make-data", "--precision", "--quick", "--batches", "--repeats", "--json"):
        assert flag in script.stdout, flag
    assert script.stdout.split("options:")[1] == module.stdout.split("options:")[1]


def test_paper_preset_composes_the_paper_e2e_recipe_on_r50(tmp_path):
    args = training.parse_args([])
    cfg = training.compose_cfg(training.overrides_of(args), tmp_path)
    assert cfg.task_name == "paper_e2e_x101_448"
    assert cfg.backbone.name == "R-50" and cfg.backbone.stride_in_1x1 and cfg.backbone.weights is None
    assert cfg.backbone.norm == "FrozenBN" and cfg.backbone.freeze_at == 2
    assert cfg.backbone.grad_checkpointing and cfg.backbone.channels_last and cfg.backbone.res5_dilation == 1
    assert list(cfg.data.image_size) == [448, 448]
    assert cfg.data.batch_size == 64 and not cfg.data.group_by_image  # 64 questions, one image each
    assert cfg.model.head.size == "small" and cfg.model.head.glove_path is None
    assert cfg.trainer.precision == "bf16-mixed"


def test_quick_replaces_the_preset_keys_it_sets(tmp_path):
    args = training.parse_args(["--quick", "--override", "data.batch_size=3"])
    overrides = training.overrides_of(args)
    keys = [o.split("=")[0] for o in overrides]
    assert len(keys) == len(set(keys)), overrides  # Hydra refuses a key given twice
    cfg = training.compose_cfg(overrides, tmp_path)
    assert cfg.backbone.name == "R-tiny" and cfg.model.head.size == "tiny"
    assert cfg.data.batch_size == 3 and list(cfg.data.image_size) == [64, 64]
    assert (args.batches, args.repeats, args.make_data) == (2, 1, True)


def test_quick_run_rows_and_ratios(tmp_path, capsys, monkeypatch):
    # device syncs inside each pass of (b) and (c): only at its ends, however many batches it runs
    syncs: dict[str, list[int]] = {"backbone": [], "head": []}
    inside: list[str] = []
    real_sync = training.Passes.sync

    def counted_sync(self) -> None:
        if inside:
            syncs[inside[-1]][-1] += 1
        real_sync(self)

    def counted(kind: str):
        real = getattr(training.Passes, kind)

        def run(self) -> None:
            inside.append(kind)
            syncs[kind].append(0)
            try:
                real(self)
            finally:
                inside.pop()

        return run

    monkeypatch.setattr(training.Passes, "sync", counted_sync)
    for kind in syncs:
        monkeypatch.setattr(training.Passes, kind, counted(kind))
    out_json = tmp_path / "figures.json"
    assert training.main(["--quick", "--precision", "32-true", "--json", str(out_json)]) == 0
    assert syncs == {"backbone": [2, 2], "head": [2, 2]}  # 2 batches, 2 epochs
    out = capsys.readouterr().out
    step = re.search(r"32-true: step / \(b \+ c\) images/s = ([0-9.]+)\s+goal >= 0.85\s+(PASS|FAIL)", out)
    loader = re.search(r"32-true: loader / step images/s\s+= ([0-9.]+)x\s+goal >= 2.0x\s+(PASS|FAIL)", out)
    assert step and loader, out
    for row in ("(a) training step", "(b) backbone", "(c) head"):
        line = next(x for x in out.splitlines() if x.startswith(row))
        ms, rate = (float(v) for v in line.split()[-3:-1])
        assert ms > 0 and rate > 0, line
    assert "2 batches of 2.0 images 64x64" in out and "backbone R-tiny" in out

    record = json.loads(out_json.read_text())
    p = record["precisions"]["32-true"]
    # one warm-up epoch + one measured repeat of every kind, all timed
    assert {k: len(v) for k, v in p["raw_pass_seconds"].items()} == {k: 2 for k in training.Passes.KINDS}
    rows = p["rows"]
    assert set(rows) == {"step", "backbone", "head", "backbone+head", "optimizer", "pixels", "rest"}
    for k in ("step", "backbone", "head"):
        assert rows[k]["images_per_s"] == pytest.approx(2 / rows[k]["seconds_per_batch"])
        assert rows[k]["peak_memory_mb"] is None  # a CPU: no device memory figure
    b, c, a = (p["raw_pass_seconds"][k][1] for k in ("backbone", "head", "step"))
    assert p["step_over_parts"] == pytest.approx((b + c) / a)
    r = record["ratios"]["32-true"]
    assert r["step_over_parts"] == pytest.approx(float(step.group(1)), abs=1e-3)
    assert r["loader_over_step"] == pytest.approx(
        record["loader"]["after_startup_images_per_s"] / rows["step"]["images_per_s"]
    )
    assert record["loader"]["batches"] >= 5 and record["loader"]["workers"] == 1  # 3 x workers + 2
    assert record["setting"]["images_per_batch"] == 2 and record["environment"]["device"] == "cpu"
    assert "bf16_over_fp32" not in record["ratios"]  # one precision asked for


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "nothing"
    assert training.main(["--data-root", str(root), "--batches", "1", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(root) in err and "--make-data" in err


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit):
        training.main(["--batches", "0"])
