"""scripts/bench_train.py runs the real e2e config on a tiny generated set and prints both ratios."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prints_both_ratios_with_positive_figures(bench, tmp_path, capsys):
    out_json = tmp_path / "figures.json"
    argv = [
        "--data-root", str(tmp_path / "absent"), "--make-data",
        "--batches", "2", "--repeats", "1", "--image-size", "64", "--num-workers", "1", "--threads", "1",
        "--override", "data.batch_size=2", "--json", str(out_json),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    step = re.search(r"step / \(b \+ c\) = ([0-9.]+)\s+goal <= 1.15\s+(PASS|FAIL)", out)
    loader = re.search(r"loader / step\s+= ([0-9.]+)x\s+goal >= 2.0x\s+(PASS|FAIL)", out)
    assert step and loader, out
    assert float(step.group(1)) > 0 and float(loader.group(1)) > 0
    for row in ("(a) training step", "(b) backbone", "(c) head", "(d) data loader, 1 workers"):
        line = next(x for x in out.splitlines() if x.startswith(row))
        ms, rate = (float(v) for v in line.split()[-2:])
        assert ms > 0 and rate > 0, line
    assert "2 batches of 2.0 images 64x64" in out

    figures = json.loads(out_json.read_text())
    raw = figures["raw_pass_seconds"]
    # one warm-up epoch + one measured repeat of every kind, all timed
    assert {k: len(v) for k, v in raw.items()} == {"step": 2, "backbone": 2, "head": 2, "optimizer": 2}
    assert all(t > 0 for v in raw.values() for t in v)
    assert figures["batches"] == 2 and figures["step_ratio"] == pytest.approx(float(step.group(1)), abs=1e-3)


def test_missing_data_is_a_one_line_error(bench, tmp_path, capsys):
    root = tmp_path / "nothing"
    assert bench.main(["--data-root", str(root), "--batches", "1", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(root) in err and "--make-data" in err


def test_bad_counts_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--batches", "0"])
