"""`gridvqa.reporting` / `python -m gridvqa.report` on hand-made sweep folders (real files)."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from gridvqa.errors import DataError
from gridvqa.report import main as report_main
from gridvqa.reporting import (
    collect_runs,
    load_run,
    plot,
    plot_label,
    summarize,
    to_csv,
    to_markdown,
    write_report,
)

ACC = {  # (experiment, seed) -> val/vqa_acc
    ("frozen", 1): 38.0,
    ("frozen", 2): 39.0,
    ("frozen", 3): 40.0,
    ("e2e", 1): 41.0,
    ("e2e", 2): 43.0,
    ("e2e", 3): 42.0,
}


def write_run(folder: Path, experiment: str, seed: int, acc: float, extra: list[str] = ()) -> Path:
    """A metrics.json as gridvqa.training.run writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "format_version": 1,
        "task_name": experiment,
        "experiment": experiment,
        "seed": seed,
        "overrides": [f"experiment={experiment}", f"seed={seed}", *extra],
        "job_num": int(folder.name) if folder.name.isdigit() else None,
        "optimized_metric": {"name": "val/vqa_acc", "value": acc},
        "metrics": {
            "train/loss": 3.0,
            "val/loss": 2.0,
            "val/vqa_acc": acc,
            "val/vqa_acc_yes_no": acc + 20,
        },
        "minutes": 1.5,
    }
    (folder / "metrics.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder / "metrics.json"


@pytest.fixture
def sweep(tmp_path) -> Path:
    """logs/multiruns/<time>/<job>/metrics.json for experiment=frozen,e2e seed=1,2,3."""
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    for job, (exp, seed) in enumerate(ACC):
        write_run(root / str(job), exp, seed, ACC[(exp, seed)], extra=["debug=fdr"])
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_groups_by_overrides_minus_seed(sweep):
    runs, problems = collect_runs(sweep)
    assert problems == [] and len(runs) == 6
    report = summarize(runs, sweep_dir=sweep)
    assert [r.label for r in report.rows] == ["experiment=frozen", "experiment=e2e"]  # sweep order
    assert report.common == ["debug=fdr"]
    assert report.primary == "val/vqa_acc"
    assert report.metrics == ["val/vqa_acc", "val/loss", "val/vqa_acc_yes_no"]  # no train/*
    e2e = report.rows[1]
    assert e2e.seeds == [1, 2, 3]
    s = e2e.stats["val/vqa_acc"]
    assert s.n == 3 and s.mean == pytest.approx(42.0)
    assert s.std == pytest.approx(statistics.stdev([41.0, 43.0, 42.0]))  # sample std over seeds
    assert e2e.minutes.mean == pytest.approx(1.5)


def test_markdown_csv_png(sweep, tmp_path):
    out = tmp_path / "out"
    report, written = write_report(sweep, out)
    md = written["md"].read_text()
    assert "| `experiment=e2e` | 3 | 1,2,3 | 42.00 ± 1.00 |" in md
    assert "**val/vqa_acc**" in md and "`debug=fdr`" in md
    rows = list(csv.DictReader(io.StringIO(written["csv"].read_text())))
    assert [r["configuration"] for r in rows] == ["experiment=frozen", "experiment=e2e"]
    assert float(rows[0]["val/vqa_acc_mean"]) == pytest.approx(39.0)
    assert float(rows[0]["val/vqa_acc_std"]) == pytest.approx(1.0)
    assert rows[0]["n"] == "3" and rows[0]["seeds"] == "1 2 3"
    with Image.open(written["png"]) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100
    assert not (sweep / "report.md").exists()  # --out respected


def test_long_override_labels_wrap_and_the_plot_keeps_its_layout(tmp_path):
    long = ["++model.head.dropout=0.0", "++model.head.ffn=256", "model.lr=0.0005", "task_name=region_head",
            "trainer.max_epochs=10"]
    for seed in (1, 2):
        write_run(tmp_path / "runs" / f"a{seed}", "frozen_random", seed, 40.0 + seed)
        write_run(tmp_path / "runs" / f"b{seed}", "region", seed, 80.0 + seed, extra=long)
    runs, _ = collect_runs(tmp_path / "runs")
    report = summarize(runs, sweep_dir=tmp_path / "runs")
    label = report.rows[1].label
    assert len(label) > 100
    wrapped = plot_label(label)
    assert wrapped.replace("\n", " ") == label and max(map(len, wrapped.splitlines())) <= 40
    assert plot_label("x" * 50) == "x" * 50  # one override is never cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when the labels leave the axes no room
        path = plot(report, tmp_path / "report.png")
    with Image.open(path) as im:
        assert im.width > 900


def test_single_seed_has_no_std_and_missing_metric_is_a_dash(tmp_path):
    write_run(tmp_path / "0", "frozen", 1, 30.0)
    p = write_run(tmp_path / "1", "region", 1, 35.0)
    data = json.loads(p.read_text())
    del data["metrics"]["val/vqa_acc_yes_no"]
    p.write_text(json.dumps(data))
    report = summarize(collect_runs(tmp_path)[0])
    md = to_markdown(report)
    assert "| `experiment=frozen` | 1 | 1 | 30.00 |" in md
    assert "| `experiment=region` | 1 | 1 | 35.00 | 2.00 | – |" in md
    assert to_csv(report).splitlines()[1].split(",")[6] == ""  # std empty with one seed


def test_several_tasks_and_optuna_style_overrides(tmp_path):
    """Trials of an Optuna sweep differ in sampled values only: one row each."""
    for job, lr in enumerate([1e-4, 3e-4]):
        write_run(tmp_path / str(job), "e2e", 42, 40.0 + job, extra=[f"model.lr={lr}"])
    report = summarize(collect_runs(tmp_path)[0])
    assert [r.label for r in report.rows] == ["model.lr=0.0001", "model.lr=0.0003"]
    assert report.common == ["experiment=e2e"]


def test_ignore_other_keys(sweep):
    report = summarize(collect_runs(sweep)[0], ignore=["seed", "experiment"])
    # frozen and e2e still differ by task name even when `experiment` is ignored
    assert len(report.rows) == 2 and all(r.label.startswith(r.task_name) for r in report.rows)


def test_no_such_dir(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such directory"):
        collect_runs(tmp_path / "nope")


def test_no_metrics_json(tmp_path):
    (tmp_path / "0").mkdir()
    with pytest.raises(DataError, match=r"no metrics\.json found"):
        collect_runs(tmp_path)


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "corrupt metrics.json \\(line 1"),
        ("[1, 2]", "expected an object"),
        ('{"metrics": {"val/vqa_acc": "high"}}', "'val/vqa_acc' is not a number"),
        ('{"task_name": "x"}', "no 'metrics' object"),
    ],
)
def test_corrupt_file_is_named(tmp_path, content, why):
    p = tmp_path / "3" / "metrics.json"
    p.parent.mkdir()
    p.write_text(content)
    with pytest.raises(DataError, match=why) as e:
        load_run(p)
    assert str(e.value).startswith(str(p))
    with pytest.raises(DataError, match=why):  # the only file: the report cannot be made
        collect_runs(tmp_path)


def test_corrupt_files_skipped_when_others_are_fine(sweep, tmp_path):
    bad = sweep / "6" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"metrics": ')  # a run killed while writing without the atomic write
    runs, problems = collect_runs(sweep)
    assert len(runs) == 6 and len(problems) == 1 and str(bad) in problems[0]
    report, written = write_report(sweep, tmp_path / "out")
    assert "Skipped 1 corrupt metrics.json" in written["md"].read_text()


def test_cli(sweep, tmp_path, capsys):
    assert report_main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "experiment=e2e" in out and "wrote" in out
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "report.csv", "report.png"}
    assert report_main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'missing'}: no such directory"


def test_cli_does_not_import_lightning(sweep):
    """The report runs where matplotlib does: no torch / lightning import on its path."""
    code = (
        "import sys; from gridvqa.report import main; main([sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'lightning', 'transformers', 'timm') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    r = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (sweep / "report.png").is_file()
