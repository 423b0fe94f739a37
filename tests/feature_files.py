"""Real HDF5 feature files for tests: random ones for the images of a VQA split, and deterministic per-id
grids and regions with helpers to write, check and compare them."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from gridvqa.data.features import FeatureWriter, open_features
from gridvqa.data.vqa2 import load_split

PROV = {"backbone": "r50", "checkpoint_sha256": "ab12", "resize": {"short": 600, "max": 1000}}
C = 8


def write_features(root: Path, kind: str, split: str, dim: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ids = sorted({e.image_id for e in load_split(root, split, with_answers=False)})
    path = root / "features" / f"{kind}_{split}.h5"
    with FeatureWriter(path, kind, {"test": "random"}, overwrite=True) as w:
        for i in ids:
            if kind == "grid":
                w.add_grid(i, rng.standard_normal((3, 4, dim)).astype(np.float32), (96, 128))
            else:
                n = int(rng.integers(10, 16))
                xy = rng.uniform(0, 60, (n, 2))
                boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1).astype(np.float32)
                w.add_region(i, rng.standard_normal((n, dim)).astype(np.float32), boxes, (96, 128))
    return path


def make_grid(i: int) -> np.ndarray:
    """Deterministic per-id grid with a per-id shape (SIGKILL'd child processes import this too)."""
    rng = np.random.default_rng(i)
    return (rng.standard_normal((1 + i % 3, 2 + i % 4, C)) * 10).astype(np.float32)


def grid_size(i: int) -> tuple[int, int]:
    return 100 + i, 200 + i


def make_region(i: int, attrs: bool = True) -> dict:
    rng = np.random.default_rng(1000 + i)
    n = 2 + i % 5
    xy = rng.uniform(0, 50, (n, 2))
    out = {
        "features": rng.standard_normal((n, C)).astype(np.float32),
        "boxes": np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], axis=1),
        "labels": rng.integers(0, 1600, n),
        "scores": rng.uniform(0.2, 1, n),
    }
    if attrs:
        out["attr_labels"] = rng.integers(0, 400, (n, 3))
        out["attr_scores"] = rng.uniform(0, 1, (n, 3))
    return out


def write_grid(path: Path, ids, prov: dict | None = None, **kw) -> Path:
    with FeatureWriter(path, "grid", PROV if prov is None else prov, **kw) as w:
        for i in ids:
            assert w.add_grid(i, make_grid(i), grid_size(i))
    return path


def write_region(path: Path, ids, prov: dict | None = None, **kw) -> Path:
    with FeatureWriter(path, "region", PROV if prov is None else prov, **kw) as w:
        for i in ids:
            assert w.add_region(i, image_size=(50 + i, 60), **make_region(i))
    return path


def flushed_writer(path: Path, n: int, commit_bytes: int) -> FeatureWriter:
    """An open writer on `path` whose grid images 0..n-1 are committed as several parts, not consolidated."""
    w = FeatureWriter(path, "grid", PROV, commit_bytes=commit_bytes)
    for i in range(n):
        w.add_grid(i, make_grid(i), grid_size(i))
    w.flush()
    return w


def check_intact(path: Path) -> set[int]:
    """Every grid image visible in the file equals what was written; returns their ids."""
    r = open_features(path)
    ids = r.image_ids
    assert len(ids) == len(set(ids))
    for i in ids:
        np.testing.assert_array_equal(r.get(i)["grid"], make_grid(i).astype(np.float16))
        assert r.get(i)["image_size"] == grid_size(i)
    r.close()
    return set(ids)


def file_contents(path: Path) -> dict:
    """Every root attribute and dataset of an HDF5 file (dtype, shape and values): equal dicts mean the
    same file as far as any reader can tell."""
    with h5py.File(path, "r") as f:
        out: dict = {f"@{k}": v for k, v in f.attrs.items()}
        for name, ds in f.items():
            a = ds[()]
            out[name] = (ds.dtype.str, a.shape, a.tobytes() if a.dtype.kind != "O" else a.tolist())
    return out


def kill_and_resume(
    script: Path,
    path: Path,
    n: int,
    *,
    rounds: int,
    seed: int,
    gap: tuple[int, int],
    check_running: tuple = (),
) -> subprocess.CompletedProcess:
    """Runs the writer script (args: file, n; it prints the count of committed images after each commit and
    "closing" before the final consolidation) `rounds` times, SIGKILLing it at a random moment `gap` images
    after the last kill (the last round within the consolidation), checks after each kill that the file
    is readable, shows nothing half-written and has lost nothing committed; then runs it to the end and
    returns that run. `check_running`: rounds that also read the file while the writer goes on."""
    cmd = [sys.executable, str(script), str(path), str(n)]
    rng = random.Random(seed)
    seen = 0
    for round_ in range(rounds):
        target = seen + rng.randint(*gap) if round_ < rounds - 1 else None
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        reported = seen
        for line in child.stdout:
            if line.strip() == "closing":
                reported = n  # flushed: everything is committed
                break
            reported = int(line)
            if target is not None and reported >= target:
                break
        else:
            raise AssertionError(f"the writer finished before round {round_} could kill it")
        if target is None and reported != n:
            raise AssertionError(f"round {round_} should have reached the consolidation")
        if round_ in check_running:
            check_intact(path)  # readable while the writer is running (it goes on meanwhile)
        # a random moment: mid-add, mid-part, mid-index; in the last round within the consolidation
        time.sleep(rng.uniform(0, 0.02 if target is not None else 0.1))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        # the consolidation may beat the last kill: then this round checks the finished file
        assert child.returncode == -signal.SIGKILL or (target is None and child.returncode == 0)
        done = check_intact(path)  # nothing half-written visible
        assert len(done) >= reported  # what the writer had committed is never lost
        seen = len(done)
    assert seen == n
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert sorted(path.parent.iterdir()) == [path]  # leftovers of the killed runs are gone
    return final
